//! The simulated workers, the coordinator they talk to, and the durable store behind it.

use std::collections::VecDeque;

use dapt_proto::job::JobSpec;
use proptest::test_runner::TestCaseError;

use super::*;
use crate::ledger::Ledger;

/// Embedded membership through the real files of `ledger.rs`, in a directory of its own.
struct Files {
    _dir: tempfile::TempDir,
    spec: JobSpec,
    ledger: Ledger,
}

fn failed(what: &str, e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{what}: {e}"))
}

/// An order that reached a worker, or the end of its session.
#[derive(Debug, Clone)]
enum Order {
    Action(Action),
    SessionEnded(ConnId),
    /// A commit is durable: the worker stops keeping what it covers for a replay.
    Committed(u64),
}

#[derive(Debug)]
struct Worker {
    id: WorkerId,
    alive: bool,
    hung: bool,
    /// The session it talks on (the newest).
    conn: ConnId,
    current: Option<Assignment>,
    next_step: u64,
    /// Messages in flight to the coordinator, oldest first.
    outbox: VecDeque<Event>,
    /// Orders it has not read yet (it is hung).
    inbox: VecDeque<Order>,
    /// etcd: the reports of its generation that no durable commit covers.
    replay: Vec<Event>,
    diverge: bool,
    last_report: Option<Event>,
    finished: bool,
    /// Its generation's training ended at the operator's stop (`World::stop_at`).
    stopped: bool,
}

pub(super) struct World {
    setup: Setup,
    state: Option<JobState>,
    t0: Instant,
    now: Instant,
    next_conn: ConnId,
    workers: Vec<Worker>,
    /// etcd: commits the committer has not recorded yet.
    pending: Vec<(Committed, Vec<LedgerEntry>)>,
    durable: Option<Committed>,
    durable_ledger: Vec<LedgerEntry>,
    record: Option<GenerationRecord>,
    shut_down: bool,
    /// Per generation, the steps done at which its ranks stop (`Action::Stop`): the first step
    /// every rank of it begins after the first order arrived, as the real ranks agree on it
    /// through the step's loss all-reduce.
    stop_at: BTreeMap<u64, u64>,
    /// The highest generation any coordinator assigned.
    highest_assigned: u64,
    /// etcd: the leader loses its leadership when it next records a generation.
    depose_at_next_record: bool,
    /// Embedded: the ledger files, when the case runs through them.
    files: Option<Files>,
    /// What happened, for the failure message.
    trace: Vec<String>,
}

fn endpoint(i: usize) -> String {
    format!("10.0.0.{}:29500", i + 1)
}

impl World {
    pub(super) fn new(setup: Setup) -> Self {
        let now = Instant::now();
        let config = config(&setup);
        let durable = setup.resumed.filter(|s| *s > 0).map(|step| Committed {
            step,
            dir: format!("/ckpt/step-{step:08}"),
            generation: 1,
            ..Default::default()
        });
        // The earlier run's ledger, as it left it.
        let durable_ledger = durable.as_ref().map_or_else(Vec::new, |c| {
            (0..c.step)
                .map(|step| LedgerEntry {
                    step,
                    generation: 1,
                    rank: 0,
                    start: step * setup.global_batch,
                    end: (step + 1) * setup.global_batch,
                })
                .collect()
        });
        let state = JobState::new(config, durable.clone());
        let mut world = World {
            workers: Vec::new(),
            setup,
            state: Some(state),
            t0: now,
            now,
            next_conn: 1,
            pending: Vec::new(),
            durable,
            durable_ledger,
            record: None,
            files: None,
            shut_down: false,
            stop_at: BTreeMap::new(),
            highest_assigned: 0,
            depose_at_next_record: false,
            trace: Vec::new(),
        };
        for (i, name) in NAMES.iter().enumerate().take(world.setup.workers) {
            let conn = world.conn();
            let mut w = Worker {
                id: WorkerId((*name).into()),
                alive: true,
                hung: false,
                conn,
                current: None,
                next_step: 0,
                outbox: VecDeque::new(),
                inbox: VecDeque::new(),
                replay: Vec::new(),
                diverge: false,
                last_report: None,
                finished: false,
                stopped: false,
            };
            w.outbox.push_back(join(&w, i, None));
            world.workers.push(w);
        }
        world
    }

    /// The same world, its commits and generations written through a real [`Ledger`] (embedded
    /// membership only); the restarted coordinator reads them back from there.
    pub(super) fn with_files(mut self) -> Result<Self, TestCaseError> {
        if self.setup.membership != Membership::Embedded {
            return Ok(self);
        }
        let dir = tempfile::tempdir().map_err(|e| failed("tempdir", e))?;
        let b = self.setup.global_batch;
        let mut spec = JobSpec::parse(&format!(
            "job: job\nseed: 1\ncorpus:\n  output: {0}/c\n  sources:\n    - name: d\n      role: domain\n      paths: [x]\n      weight: 1\ntraining:\n  seq_len: 8\n  global_batch: {b}\n  tokens: {1}\ncheckpoint:\n  dir: {0}/ckpt\n",
            dir.path().display(),
            8 * b * self.setup.total_steps,
        ))
        .map_err(|e| failed("job", e))?;
        spec.checkpoint.dir = dir.path().join("ckpt");
        let (ledger, _) = Ledger::open(&spec).map_err(|e| failed("open", e))?;
        if let Some(c) = &self.durable {
            // The earlier run's commit.
            ledger
                .commit(c, &self.durable_ledger)
                .map_err(|e| failed("commit", e))?;
        }
        self.files = Some(Files {
            _dir: dir,
            spec,
            ledger,
        });
        Ok(self)
    }

    /// Embedded: the ledger on disk holds what was committed, every sample once.
    pub(super) fn check_files(&self) -> Result<(), TestCaseError> {
        let Some(f) = &self.files else {
            return Ok(());
        };
        let mut on_disk = f.ledger.entries().map_err(|e| failed("ledger", e))?;
        let step = self.durable.as_ref().map_or(0, |c| c.step);
        check_ledger(&on_disk, step, self.setup.global_batch)
            .map_err(|v| failed("the ledger on disk", v))?;
        let mut expected = self.durable_ledger.clone();
        let key = |e: &LedgerEntry| (e.step, e.rank, e.generation);
        on_disk.sort_by_key(key);
        expected.sort_by_key(key);
        if on_disk != expected {
            return Err(failed(
                "the ledger on disk",
                format!("{on_disk:?} instead of {expected:?}"),
            ));
        }
        Ok(())
    }

    pub(super) fn state(&self) -> &JobState {
        self.state.as_ref().expect("a state between decisions")
    }

    fn conn(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    fn ms(&self) -> u128 {
        self.now.duration_since(self.t0).as_millis()
    }

    /// One decision, checked; its actions reach the workers and the store.
    fn decide(&mut self, event: Event) -> Result<(), TestCaseError> {
        let prev = self.state.take().expect("a state between decisions");
        self.trace.push(format!(
            "t={}ms {}",
            self.ms(),
            invariants::describe(&event)
        ));
        let (next, actions) = decide(prev.clone(), event.clone(), self.now);
        if let Err(v) = check_transition(&prev, &event, &next, &actions) {
            return Err(TestCaseError::fail(format!(
                "{v}\nafter: {}\nphase {} -> {}\ntrace (last 30):\n  {}",
                invariants::describe(&event),
                prev.phase.name(),
                next.phase.name(),
                self.trace[self.trace.len().saturating_sub(30)..].join("\n  ")
            )));
        }
        self.state = Some(next);
        let mut batch = None;
        for action in actions {
            if matches!(action, Action::RecordGeneration(_))
                && std::mem::take(&mut self.depose_at_next_record)
            {
                // etcd refuses the record: this leader is deposed and carries out nothing more.
                self.trace
                    .push("the leader is deposed while recording a generation".into());
                return self.take_over();
            }
            if let Action::Assign { assignment, .. } = &action {
                // Generations fence stale messages only if none is handed out twice, whichever
                // coordinator hands it out.
                let g = assignment.generation.0;
                if batch != Some(g) {
                    if g <= self.highest_assigned {
                        return Err(TestCaseError::fail(format!(
                            "generation {g} assigned again (the highest so far: {})\ntrace (last 30):\n  {}",
                            self.highest_assigned,
                            self.trace[self.trace.len().saturating_sub(30)..].join("\n  ")
                        )));
                    }
                    self.highest_assigned = g;
                    batch = Some(g);
                }
            }
            self.carry_out(action)?;
        }
        Ok(())
    }

    fn carry_out(&mut self, action: Action) -> Result<(), TestCaseError> {
        match action {
            Action::Commit { committed, ledger } => {
                self.pending.push((committed, ledger));
                if self.setup.membership == Membership::Embedded {
                    // The files are written before the loop goes on.
                    self.make_durable()?;
                }
            }
            Action::RecordGeneration(record) => {
                if let Some(f) = &self.files {
                    f.ledger
                        .record_generation(&record)
                        .map_err(|e| failed("record", e))?;
                }
                self.record = Some(record);
            }
            Action::Assign { conn, .. }
            | Action::Abort { conn, .. }
            | Action::Finish { conn, .. }
            | Action::Stop { conn, .. }
            | Action::RefuseJoin { conn, .. } => self.order(conn, Order::Action(action)),
            Action::Drop { conn, .. } => self.order(conn, Order::SessionEnded(conn)),
            Action::Accept { .. }
            | Action::Refuse { .. }
            | Action::Log(_)
            | Action::FallBack { .. } => {}
        }
        Ok(())
    }

    /// Sends `order` down session `conn`, if a worker still listens on it.
    fn order(&mut self, conn: ConnId, order: Order) {
        if let Some(i) = self.workers.iter().position(|w| w.alive && w.conn == conn) {
            self.workers[i].inbox.push_back(order);
            self.read_orders(i);
        }
    }

    fn make_durable(&mut self) -> Result<(), TestCaseError> {
        let Some((last, _)) = self.pending.last().cloned() else {
            return Ok(());
        };
        for (committed, mut entries) in self.pending.drain(..) {
            if let Some(f) = &self.files {
                f.ledger
                    .commit(&committed, &entries)
                    .map_err(|e| failed("commit", e))?;
            }
            self.durable_ledger.append(&mut entries);
        }
        if let Err(v) = check_ledger(&self.durable_ledger, last.step, self.setup.global_batch) {
            return Err(TestCaseError::fail(format!(
                "the durable ledger at step {}: {v}\ntrace:\n  {}",
                last.step,
                self.trace.join("\n  ")
            )));
        }
        let step = last.step;
        self.durable = Some(last);
        for i in 0..self.workers.len() {
            if self.workers[i].alive {
                self.workers[i].inbox.push_back(Order::Committed(step));
                self.read_orders(i);
            }
        }
        Ok(())
    }

    /// The worker acts on the orders it received, unless it is stopped.
    fn read_orders(&mut self, i: usize) {
        while !self.workers[i].hung && self.workers[i].alive {
            let Some(order) = self.workers[i].inbox.pop_front() else {
                return;
            };
            let w = &mut self.workers[i];
            match order {
                Order::Action(Action::Assign { assignment, .. }) => {
                    w.stopped = false;
                    w.next_step = assignment.resume_step;
                    w.current = Some(assignment);
                    w.replay.clear();
                }
                Order::Action(Action::Abort { generation, .. }) => {
                    if w.current
                        .as_ref()
                        .is_some_and(|a| a.generation == generation)
                    {
                        w.current = None;
                        w.replay.clear();
                    }
                    let event = Event::Aborted {
                        conn: w.conn,
                        worker: w.id.clone(),
                        generation,
                    };
                    w.outbox.push_back(event);
                }
                Order::Action(Action::Finish { .. }) => {
                    w.finished = true;
                    w.alive = false;
                    let event = Event::Disconnected {
                        conn: w.conn,
                        worker: w.id.clone(),
                    };
                    w.outbox.push_back(event);
                }
                Order::Action(Action::Stop { generation, .. }) => {
                    if w.current
                        .as_ref()
                        .is_some_and(|a| a.generation == generation)
                    {
                        let done = 1 + self
                            .workers
                            .iter()
                            .filter(|o| {
                                o.current
                                    .as_ref()
                                    .is_some_and(|a| a.generation == generation)
                            })
                            .map(|o| o.next_step)
                            .max()
                            .unwrap_or(0);
                        self.stop_at.entry(generation.0).or_insert(done);
                    }
                }
                Order::Action(Action::RefuseJoin { .. }) => {
                    // The agent exits on a refused join.
                    w.alive = false;
                    w.current = None;
                }
                Order::Action(_) => {}
                Order::SessionEnded(conn) => {
                    if conn == w.conn {
                        let event = Event::Disconnected {
                            conn,
                            worker: w.id.clone(),
                        };
                        w.outbox.push_back(event);
                        self.reconnect(i);
                    }
                }
                Order::Committed(step) => w.replay.retain(|e| match e {
                    Event::Step { info, .. } => info.step >= step,
                    Event::Checkpoint { step: s, .. } => *s > step,
                    _ => true,
                }),
            }
        }
    }

    /// The worker's session is gone: it joins again (embedded), or re-attaches with its
    /// generation and replays its reports (etcd).
    fn reconnect(&mut self, i: usize) {
        let conn = self.conn();
        let etcd = self.setup.membership == Membership::Etcd;
        let w = &mut self.workers[i];
        w.conn = conn;
        let attach = etcd
            .then(|| w.current.as_ref().map(|a| (a.generation, a.rank)))
            .flatten();
        let event = join(w, i, attach);
        w.outbox.push_back(event);
        if etcd {
            for mut e in w.replay.clone() {
                set_conn(&mut e, conn);
                w.outbox.push_back(e);
            }
        } else {
            w.replay.clear();
        }
    }

    fn train(&mut self, i: usize) {
        let etcd = self.setup.membership == Membership::Etcd;
        let (batch, every) = (self.setup.global_batch, self.setup.every);
        let stop_at = self.workers[i]
            .current
            .as_ref()
            .and_then(|a| self.stop_at.get(&a.generation.0).copied());
        let w = &mut self.workers[i];
        if !w.alive || w.hung || w.stopped {
            return;
        }
        let Some(a) = w.current.clone() else {
            return;
        };
        if w.next_step >= a.total_steps {
            return;
        }
        let step = w.next_step;
        w.next_step += 1;
        let done = step + 1;
        let slice = rank_slice(step, batch, a.rank, a.world);
        let report = Event::Step {
            conn: w.conn,
            worker: w.id.clone(),
            generation: a.generation,
            info: StepInfo {
                step,
                rank: a.rank,
                samples: (slice.start, slice.end),
                loss: 5.0 / done as f64,
                grad_norm: 1.0,
                lr: 1e-4,
                tokens: batch * 8,
                elapsed: Duration::from_millis(100),
                times: StepTimes::default(),
                peak_flops: None,
            },
        };
        w.outbox.push_back(report.clone());
        if etcd {
            w.replay.push(report.clone());
        }
        w.last_report = Some(report);
        if a.rank == 0 && done == a.total_steps {
            w.outbox.push_back(Event::Eval {
                conn: w.conn,
                worker: w.id.clone(),
                generation: a.generation,
                step: done,
                source: "held-out".into(),
                perplexity: 12.5,
                tokens: 100,
            });
        }
        let stop = stop_at == Some(done) && done < a.total_steps;
        if done.is_multiple_of(every) || done == a.total_steps || stop {
            let digest = if std::mem::take(&mut w.diverge) {
                format!("diverged-{}", w.id)
            } else {
                format!("weights-{done}")
            };
            let report = Event::Checkpoint {
                conn: w.conn,
                worker: w.id.clone(),
                generation: a.generation,
                step: done,
                rank: a.rank,
                dir: if a.rank == 0 {
                    format!("/ckpt/step-{done:08}")
                } else {
                    String::new()
                },
                digest,
                stop,
            };
            w.outbox.push_back(report.clone());
            if etcd {
                w.replay.push(report.clone());
            }
            w.last_report = Some(report);
            // Its training ends with the stop's checkpoint.
            w.stopped = stop;
        }
    }

    pub(super) fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let n = self.workers.len();
        let etcd = self.setup.membership == Membership::Etcd;
        match *op {
            Op::Deliver(i) => {
                if let Some(event) = self.workers[i % n].outbox.pop_front() {
                    self.decide(event)?;
                }
            }
            Op::Train(i) => self.train(i % n),
            Op::Heartbeat(i) => {
                let w = &mut self.workers[i % n];
                if w.alive && !w.hung {
                    let event = Event::Heartbeat {
                        conn: w.conn,
                        worker: w.id.clone(),
                    };
                    w.outbox.push_back(event);
                }
            }
            Op::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                self.decide(Event::Tick)?;
            }
            Op::Durable => self.make_durable()?,
            Op::Kill(i) => {
                let w = &mut self.workers[i % n];
                if w.alive {
                    w.alive = false;
                    w.current = None;
                    w.inbox.clear();
                    let event = Event::Disconnected {
                        conn: w.conn,
                        worker: w.id.clone(),
                    };
                    w.outbox.push_back(event);
                    self.trace.push(format!("kill {}", w.id));
                }
            }
            Op::Restart(i) => {
                let i = i % n;
                if !self.workers[i].alive {
                    let conn = self.conn();
                    let w = &mut self.workers[i];
                    *w = Worker {
                        id: w.id.clone(),
                        alive: true,
                        hung: false,
                        conn,
                        current: None,
                        next_step: 0,
                        outbox: std::mem::take(&mut w.outbox),
                        inbox: VecDeque::new(),
                        replay: Vec::new(),
                        diverge: false,
                        last_report: None,
                        finished: false,
                        stopped: false,
                    };
                    let event = join(w, i, None);
                    w.outbox.push_back(event);
                    self.trace.push(format!("restart {}", w.id));
                }
            }
            Op::Hang(i) => {
                let w = &mut self.workers[i % n];
                if w.alive && !w.hung {
                    w.hung = true;
                    self.trace.push(format!("hang {}", w.id));
                }
            }
            Op::Resume(i) => {
                let i = i % n;
                if self.workers[i].hung {
                    self.workers[i].hung = false;
                    self.trace.push(format!("resume {}", self.workers[i].id));
                    self.read_orders(i);
                }
            }
            Op::Blip(i) => {
                let i = i % n;
                let w = &self.workers[i];
                if w.alive && !w.hung {
                    self.trace.push(format!("session of {} breaks", w.id));
                    let conn = w.conn;
                    self.workers[i].inbox.push_back(Order::SessionEnded(conn));
                    self.read_orders(i);
                }
            }
            Op::Fail(i) => {
                let w = &mut self.workers[i % n];
                if w.alive && !w.hung {
                    if let Some(a) = w.current.take() {
                        let event = Event::Failed {
                            conn: w.conn,
                            worker: w.id.clone(),
                            generation: a.generation,
                            reason: "corrupt shard".into(),
                            // A fatal failure ends the job by design; the liveness check
                            // wants jobs that can complete.
                            fatal: false,
                            peer_fault: false,
                        };
                        w.outbox.push_back(event);
                    }
                }
            }
            Op::Diverge(i) => self.workers[i % n].diverge = true,
            Op::Resend(i, malformed) => {
                let w = &mut self.workers[i % n];
                if let (true, false, Some(mut event)) = (w.alive, w.hung, w.last_report.clone()) {
                    set_conn(&mut event, w.conn);
                    if malformed {
                        match &mut event {
                            Event::Step { info, .. } => info.samples.1 += 1,
                            Event::Checkpoint { step, .. } => *step += 1,
                            _ => {}
                        }
                    }
                    w.outbox.push_back(event);
                }
            }
            Op::Expire(i) => {
                if etcd {
                    let worker = self.workers[i % n].id.clone();
                    self.decide(Event::Expired { worker })?;
                }
            }
            Op::TakeOver => self.take_over()?,
            Op::Depose => self.depose_at_next_record = etcd,
            Op::Shutdown => {
                self.shut_down = true;
                self.decide(Event::Shutdown {
                    reason: "interrupted".into(),
                })?;
            }
            Op::Stop => {
                self.shut_down = true;
                self.decide(Event::Stop {
                    reason: "interrupted".into(),
                })?;
            }
        }
        Ok(())
    }

    /// The coordinator goes away (leadership lost, or a restart) and a new one starts from the
    /// durable store; every live worker's session ends.
    fn take_over(&mut self) -> Result<(), TestCaseError> {
        if self.state().phase.is_over() {
            return Ok(());
        }
        self.trace.push("coordinator taken over".into());
        self.pending.clear();
        let config = config(&self.setup);
        let unfinished = self
            .durable
            .as_ref()
            .is_none_or(|c| c.step < config.total_steps);
        let record = self
            .record
            .clone()
            .filter(|_| unfinished && self.setup.membership == Membership::Etcd);
        self.state = Some(match record {
            Some(record) => {
                let patience = Duration::from_millis(SESSION_TIMEOUT_MS + LEASE_TTL_MS);
                JobState::take_over(
                    config,
                    self.durable.clone(),
                    record,
                    self.now,
                    self.now + patience,
                )
            }
            None => {
                let mut formed = self.record.as_ref().map(|r| r.generation);
                if let Some(f) = &mut self.files {
                    // A restart reads the files back, as `server::start` does.
                    let (ledger, committed) =
                        Ledger::open(&f.spec).map_err(|e| failed("reopen", e))?;
                    // Read back under the real checkpoint.dir, of which `/ckpt` stands in
                    // for here (`committed.json` names the checkpoint, not its path).
                    let durable = self.durable.clone().map(|c| Committed {
                        dir: f
                            .spec
                            .checkpoint
                            .dir
                            .join(c.dir.trim_start_matches("/ckpt/"))
                            .display()
                            .to_string(),
                        ..c
                    });
                    if committed != durable {
                        return Err(failed(
                            "committed.json",
                            format!("{committed:?}, committed {:?}", self.durable),
                        ));
                    }
                    formed = ledger
                        .last_generation()
                        .map_err(|e| failed("generation", e))?;
                    f.ledger = ledger;
                }
                JobState::new(config, self.durable.clone()).after_generation(formed.map(Generation))
            }
        });
        for i in 0..self.workers.len() {
            // What was in flight went to the old coordinator.
            self.workers[i].outbox.clear();
            if self.workers[i].alive {
                let conn = self.workers[i].conn;
                self.workers[i].inbox.push_back(Order::SessionEnded(conn));
                self.read_orders(i);
            }
        }
        Ok(())
    }

    /// After the faults: every worker comes back and behaves; the job must end.
    pub(super) fn settle(&mut self) -> Result<(), TestCaseError> {
        self.depose_at_next_record = false;
        for i in 0..self.workers.len() {
            self.workers[i].diverge = false;
            if self.workers[i].hung {
                self.apply(&Op::Resume(i))?;
            }
            if !self.workers[i].alive && !self.workers[i].finished {
                self.apply(&Op::Restart(i))?;
            }
        }
        // (+100: an operator's stop waits up to its grace, ~90 s here, for a checkpoint.)
        for _round in 0..(140 + 4 * self.setup.total_steps) {
            if self.state().phase.is_over() {
                break;
            }
            loop {
                let mut delivered = false;
                for i in 0..self.workers.len() {
                    if !self.workers[i].outbox.is_empty() {
                        self.apply(&Op::Deliver(i))?;
                        delivered = true;
                    }
                }
                if !delivered {
                    break;
                }
            }
            for i in 0..self.workers.len() {
                self.apply(&Op::Heartbeat(i))?;
                self.apply(&Op::Train(i))?;
            }
            self.make_durable()?;
            self.apply(&Op::Tick(1_000))?;
        }
        self.make_durable()?;
        let s = self.state();
        let ended = match &s.phase {
            Phase::Completed => {
                s.committed_step() == self.setup.total_steps
                    && self
                        .durable
                        .as_ref()
                        .is_some_and(|d| d.step == self.setup.total_steps)
            }
            Phase::Stopped(_) => self.shut_down,
            // Failing too often is a way to end (the invariants check it was too often).
            Phase::Failed(_) => true,
            _ => false,
        };
        if !ended {
            return Err(TestCaseError::fail(format!(
                "the job did not complete once the faults stopped: {} in generation {}, committed {}, members {:?}, ranks {:?}\ntrace (first 60):\n  {}",
                s.phase.name(),
                s.generation,
                s.committed_step(),
                s.members.iter().map(|(w, m)| (w.0.clone(), m.rank)).collect::<Vec<_>>(),
                s.ranks,
                self.trace[..self.trace.len().min(60)].join("\n  ")
            )));
        }
        Ok(())
    }
}

fn config(setup: &Setup) -> ControlConfig {
    ControlConfig {
        job: "job".into(),
        version: "0.1.0".into(),
        min_workers: setup.min_workers,
        max_workers: setup.max_workers,
        session_timeout: Duration::from_millis(SESSION_TIMEOUT_MS),
        formation_grace: Duration::from_secs(2),
        abort_timeout: Duration::from_secs(10),
        total_steps: setup.total_steps,
        global_batch: setup.global_batch,
        micro_batch: 2,
        max_failed_generations: setup.max_failed_generations,
        stall: StallConfig::default(),
        eval_every: 0,
        checkpoint_every: 5,
        sources: ["held-out".to_string()].into(),
    }
}

fn join(w: &Worker, i: usize, attach: Option<(Generation, u32)>) -> Event {
    Event::Join {
        conn: w.conn,
        request: JoinRequest {
            job: "job".into(),
            worker: w.id.clone(),
            devices: vec!["cpu".into()],
            version: "0.1.0".into(),
            endpoint: endpoint(i),
            attach,
        },
    }
}

fn set_conn(event: &mut Event, to: ConnId) {
    match event {
        Event::Join { conn, .. }
        | Event::Disconnected { conn, .. }
        | Event::Heartbeat { conn, .. }
        | Event::Progress { conn, .. }
        | Event::Step { conn, .. }
        | Event::Checkpoint { conn, .. }
        | Event::Aborted { conn, .. }
        | Event::Failed { conn, .. }
        | Event::Eval { conn, .. } => *conn = to,
        Event::Expired { .. }
        | Event::Tick
        | Event::Shutdown { .. }
        | Event::Stop { .. }
        | Event::FellBack { .. } => {}
    }
}
