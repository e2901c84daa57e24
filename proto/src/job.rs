//! The job file: one YAML document, unknown fields refused, every error naming the field and
//! the line.

use std::path::{Path, PathBuf};

use dapt_corpus::{CorpusSpec, TrainingPlan};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// serde_yaml's message carries the field path, line and column.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's name: it scopes checkpoints, logs and (later) etcd keys.
    pub job: String,
    /// Seed of the sample order and of a from-scratch model's initialisation.
    #[serde(default)]
    pub seed: u64,
    /// The model to continue pretraining (needed to train; `prepare` does without).
    #[serde(default)]
    pub model: Option<ModelSpec>,
    pub corpus: CorpusSpec,
    /// What the job will train on; `prepare` uses it for epoch counts and held-out checks.
    #[serde(default)]
    pub training: Option<TrainingSpec>,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// How the coordinator forms and supervises the workers.
    #[serde(default)]
    pub cluster: ClusterSpec,
}

/// Where the model comes from: exactly one of `preset` (random initialisation, for tests,
/// quickstarts and planning) and `hf` (a Hugging Face model directory; a GGUF file is imported
/// into one first with `dapt import-gguf`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub preset: Option<Preset>,
    #[serde(default)]
    pub hf: Option<PathBuf>,
    /// Standard deviation of a preset's random initialisation.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Preset {
    /// 2 layers, hidden 128, 4 query / 2 key-value heads: trains in minutes on a CPU.
    #[serde(rename = "tiny")]
    Tiny,
    /// SmolLM2-135M's shape: 30 layers, hidden 576, 9/3 heads, tied embeddings.
    #[serde(rename = "smollm2-135m")]
    Smollm2_135m,
    /// Llama-2-7B's shape.
    #[serde(rename = "llama-2-7b")]
    Llama2_7b,
    /// Llama-3-8B's shape.
    #[serde(rename = "llama-3-8b")]
    Llama3_8b,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    /// Tokens per sample fed to the model (a sample reads seq_len + 1 tokens).
    pub seq_len: u32,
    /// Samples per optimizer step, whatever the number of workers.
    pub global_batch: u64,
    /// Samples per forward/backward pass on one device; gradients accumulate over them
    /// (default: the whole share of the step).
    #[serde(default)]
    pub micro_batch: Option<u64>,
    /// Training budget in tokens; the job runs ceil(tokens / (global_batch * seq_len)) steps.
    pub tokens: u64,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
    /// Recompute activations in the backward pass instead of keeping them (less memory).
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Held-out perplexity every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// At most this many tokens of each held-out set per evaluation.
    #[serde(default = "default_eval_tokens")]
    pub eval_tokens: u64,
}

/// AdamW with decoupled weight decay.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSpec {
    /// Peak learning rate, reached at the end of the warmup.
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Decoupled weight decay, applied to weight matrices; never to norms.
    pub weight_decay: f64,
    /// Also decay the embedding (and untied output) matrices.
    pub decay_embeddings: bool,
    /// Clip the global gradient norm (over all parameters) to this; 0 disables.
    pub grad_clip: f64,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            lr: 3e-4,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
            decay_embeddings: false,
            grad_clip: 1.0,
        }
    }
}

/// The learning rate over training tokens: a linear re-warm from 0 to the peak, then decay.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSpec {
    pub kind: ScheduleKind,
    /// Fraction of the token budget spent warming up.
    pub warmup: f64,
    /// The floor, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// `wsd` only: fraction of the budget, at the end, spent decaying.
    pub decay: f64,
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        ScheduleSpec {
            kind: ScheduleKind::Cosine,
            warmup: 0.02,
            min_lr_ratio: 0.1,
            decay: 0.2,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Cosine decay from the peak to the floor.
    Cosine,
    /// Linear decay from the peak to the floor.
    Linear,
    /// Warmup-stable-decay: hold the peak, then decay linearly over the last `decay` fraction.
    Wsd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// Directory of the job's checkpoints (relative to the job file).
    pub dir: PathBuf,
    /// A checkpoint every this many steps (and at the end).
    pub every: u64,
    /// Committed checkpoints kept; older ones are deleted.
    pub keep: usize,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            dir: PathBuf::from("checkpoints"),
            every: 100,
            keep: 3,
        }
    }
}

/// Membership and supervision: how many workers, how lost ones are noticed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSpec {
    /// Training starts (and resumes after a loss) once this many workers are members.
    pub min_workers: u32,
    /// At most this many ranks; further workers wait as standbys. Default: no limit.
    pub max_workers: Option<u32>,
    /// How often workers send a heartbeat, in milliseconds.
    pub heartbeat_ms: u64,
    /// A worker silent this long (milliseconds) is lost, even if its connection looks open.
    pub session_timeout_ms: u64,
    /// After the first member joins, wait this long (milliseconds) for more before forming
    /// a generation with fewer than `max_workers`.
    pub formation_grace_ms: u64,
    /// Survivors have this long (milliseconds) to confirm an abort before they are dropped.
    pub abort_timeout_ms: u64,
    /// A collective with no progress for this long (seconds) fails on the worker.
    pub collective_timeout_s: u64,
    /// Where membership and the job's durable state live: `embedded` (the coordinator's
    /// process and files under checkpoint.dir; one machine) or `etcd` (needs `etcd:`).
    /// Default: `etcd` when an `etcd:` section is given, else `embedded`.
    pub membership: Option<MembershipKind>,
    pub etcd: Option<EtcdSpec>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MembershipKind {
    Embedded,
    Etcd,
}

/// The etcd cluster that holds membership leases, the leader and the job's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSpec {
    /// Client URLs, e.g. ["http://10.0.0.5:2379"].
    pub endpoints: Vec<String>,
    /// Every key of the job lives under `<prefix>/<job>/`.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Lease TTL in seconds of each worker's membership key and of the leader key; kept alive
    /// every third of it.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: u64,
    #[serde(default)]
    pub user: Option<String>,
    /// The environment variable that holds the etcd password (never the password itself).
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub tls: Option<EtcdTls>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA certificate (PEM) that signed the etcd servers' certificates.
    pub ca: PathBuf,
    /// Client certificate and key (PEM), for etcd's client-certificate authentication.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name the servers' certificates carry, when it is not the endpoint's host.
    #[serde(default)]
    pub domain: Option<String>,
}

fn default_etcd_prefix() -> String {
    "/dapt".into()
}

fn default_lease_ttl() -> u64 {
    10
}

impl ClusterSpec {
    pub fn membership(&self) -> MembershipKind {
        self.membership.unwrap_or(if self.etcd.is_some() {
            MembershipKind::Etcd
        } else {
            MembershipKind::Embedded
        })
    }

    /// The etcd settings when membership is etcd.
    pub fn etcd(&self) -> Option<&EtcdSpec> {
        match self.membership() {
            MembershipKind::Etcd => self.etcd.as_ref(),
            MembershipKind::Embedded => None,
        }
    }
}

/// The job's keys in etcd.
pub mod keys {
    /// `<prefix>/<job>/`
    pub fn job(prefix: &str, job: &str) -> String {
        format!("{}/{job}/", prefix.trim_end_matches('/'))
    }

    /// Members' lease-bound keys: `members/<worker>` -> {"endpoint", "devices"}.
    pub fn members(prefix: &str, job: &str) -> String {
        format!("{}members/", self::job(prefix, job))
    }

    pub fn member(prefix: &str, job: &str, worker: &str) -> String {
        format!("{}{worker}", members(prefix, job))
    }

    /// The leading coordinator's URL, bound to its lease.
    pub fn leader(prefix: &str, job: &str) -> String {
        format!("{}leader", self::job(prefix, job))
    }

    /// The current generation: number, ranks and peers (JSON).
    pub fn generation(prefix: &str, job: &str) -> String {
        format!("{}generation", self::job(prefix, job))
    }

    /// The last committed checkpoint (JSON).
    pub fn committed(prefix: &str, job: &str) -> String {
        format!("{}committed", self::job(prefix, job))
    }

    /// The ledger: one key per commit, `ledger/<step, 12 digits>` -> the entries of the steps
    /// it committed (JSON array).
    pub fn ledger(prefix: &str, job: &str) -> String {
        format!("{}ledger/", self::job(prefix, job))
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            min_workers: 1,
            max_workers: None,
            heartbeat_ms: 500,
            session_timeout_ms: 5_000,
            formation_grace_ms: 2_000,
            abort_timeout_ms: 10_000,
            collective_timeout_s: 300,
            membership: None,
            etcd: None,
        }
    }
}

fn default_init_std() -> f64 {
    0.02
}

fn default_eval_tokens() -> u64 {
    65_536
}

impl TrainingSpec {
    pub fn plan(&self) -> TrainingPlan {
        TrainingPlan {
            seq_len: self.seq_len,
            global_batch: self.global_batch,
            steps: self.steps(),
        }
    }

    /// Optimizer steps of the whole job.
    pub fn steps(&self) -> u64 {
        self.tokens.div_ceil(self.tokens_per_step().max(1))
    }

    /// Tokens one step trains on.
    pub fn tokens_per_step(&self) -> u64 {
        self.global_batch * self.seq_len as u64
    }

    /// Samples per forward pass.
    pub fn micro_batch(&self) -> u64 {
        self.micro_batch.unwrap_or(self.global_batch)
    }
}

impl JobSpec {
    /// Reads and checks a job file; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut spec = Self::parse(&text).map_err(|message| SpecError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        spec.validate()
            .map_err(|(field, message)| SpecError::Invalid {
                path: path.to_path_buf(),
                field,
                message,
            })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Absolute, so that logs and reports show paths that mean something anywhere.
        let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
        spec.corpus.resolve_paths(&base);
        spec.resolve_paths(&base);
        Ok(spec)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &Path| dapt_corpus::spec::resolve_path(base, p);
        if let Some(model) = &mut self.model {
            model.hf = model.hf.as_deref().map(join);
        }
        self.checkpoint.dir = join(&self.checkpoint.dir);
        if let Some(tls) = self.cluster.etcd.as_mut().and_then(|e| e.tls.as_mut()) {
            tls.ca = join(&tls.ca);
            tls.cert = tls.cert.as_deref().map(join);
            tls.key = tls.key.as_deref().map(join);
        }
    }

    /// Checks across fields that deserialization cannot make.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.job.is_empty() {
            return Err(("job", "must not be empty".into()));
        }
        if let Some(m) = &self.model {
            if m.preset.is_some() == m.hf.is_some() {
                return Err(("model", "give exactly one of `preset` and `hf`".into()));
            }
        }
        if self.checkpoint.every == 0 {
            return Err(("checkpoint.every", "must be at least 1".into()));
        }
        if self.checkpoint.keep == 0 {
            return Err(("checkpoint.keep", "must be at least 1".into()));
        }
        let c = &self.cluster;
        if c.min_workers == 0 {
            return Err(("cluster.min_workers", "must be at least 1".into()));
        }
        if c.max_workers.is_some_and(|m| m < c.min_workers) {
            return Err((
                "cluster.max_workers",
                format!("must be at least min_workers ({})", c.min_workers),
            ));
        }
        if c.heartbeat_ms == 0 || c.session_timeout_ms <= c.heartbeat_ms {
            return Err((
                "cluster.session_timeout_ms",
                "heartbeat_ms must be positive and session_timeout_ms longer than it".into(),
            ));
        }
        if c.membership == Some(MembershipKind::Etcd) && c.etcd.is_none() {
            return Err((
                "cluster.membership",
                "`etcd` needs a `cluster.etcd:` section with its endpoints".into(),
            ));
        }
        if let Some(e) = &c.etcd {
            if e.endpoints.is_empty() {
                return Err(("cluster.etcd.endpoints", "give at least one".into()));
            }
            if e.lease_ttl_s == 0 {
                return Err(("cluster.etcd.lease_ttl_s", "must be at least 1".into()));
            }
            if e.tls
                .as_ref()
                .is_some_and(|t| t.cert.is_some() != t.key.is_some())
            {
                return Err((
                    "cluster.etcd.tls",
                    "give both `cert` and `key`, or neither".into(),
                ));
            }
        }
        if c.collective_timeout_s == 0 || c.abort_timeout_ms == 0 {
            return Err((
                "cluster",
                "collective_timeout_s and abort_timeout_ms must be positive".into(),
            ));
        }
        // Durations are added to clock readings: bounded, so that no deadline overflows.
        at_most("cluster.heartbeat_ms", c.heartbeat_ms, MAX_DURATION_MS)?;
        at_most(
            "cluster.session_timeout_ms",
            c.session_timeout_ms,
            MAX_DURATION_MS,
        )?;
        at_most(
            "cluster.formation_grace_ms",
            c.formation_grace_ms,
            MAX_DURATION_MS,
        )?;
        at_most(
            "cluster.abort_timeout_ms",
            c.abort_timeout_ms,
            MAX_DURATION_MS,
        )?;
        at_most(
            "cluster.collective_timeout_s",
            c.collective_timeout_s,
            MAX_DURATION_MS / 1000,
        )?;
        if let Some(e) = &c.etcd {
            at_most("cluster.etcd.lease_ttl_s", e.lease_ttl_s, MAX_LEASE_TTL_S)?;
        }
        if let Some(t) = &self.training {
            let o = &t.optimizer;
            if !(o.lr > 0.0 && o.lr.is_finite()) {
                return Err((
                    "training.optimizer.lr",
                    format!("must be positive, got {}", o.lr),
                ));
            }
            if !(0.0..1.0).contains(&o.betas.0) || !(0.0..1.0).contains(&o.betas.1) {
                return Err(("training.optimizer.betas", "must be in [0, 1)".into()));
            }
            if o.weight_decay < 0.0 || o.grad_clip < 0.0 || o.eps <= 0.0 {
                return Err((
                    "training.optimizer",
                    "weight_decay and grad_clip must be >= 0, eps > 0".into(),
                ));
            }
            let s = &t.schedule;
            let fraction = |x: f64| (0.0..=1.0).contains(&x);
            if !fraction(s.warmup) || !fraction(s.min_lr_ratio) || !fraction(s.decay) {
                return Err((
                    "training.schedule",
                    "warmup, min_lr_ratio and decay are fractions in [0, 1]".into(),
                ));
            }
            if t.micro_batch == Some(0) {
                return Err(("training.micro_batch", "must be at least 1".into()));
            }

            if t.seq_len == 0 {
                return Err(("training.seq_len", "must be at least 1".into()));
            }
            if t.global_batch == 0 {
                return Err(("training.global_batch", "must be at least 1".into()));
            }
            if t.tokens == 0 {
                return Err(("training.tokens", "must be at least 1".into()));
            }
            t.check_sizes()?;
        }
        Ok(())
    }
}

/// The longest `seq_len` a job may ask for (tokens per sample).
pub const MAX_SEQ_LEN: u32 = 1 << 20;
/// The most samples per optimizer step.
pub const MAX_GLOBAL_BATCH: u64 = 1 << 24;
/// The most tokens one forward pass reads on one device (`micro_batch x (seq_len + 1)`): its
/// buffers are allocated whole, and past this no device holds the activations anyway.
pub const MAX_MICRO_BATCH_TOKENS: u64 = 1 << 26;
/// The largest token budget: far past any real run, and exact in the f64 arithmetic of the
/// learning-rate schedule.
pub const MAX_TOKENS: u64 = 1 << 52;
/// The longest duration in `cluster:` (one week), in milliseconds.
pub const MAX_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// The longest etcd lease TTL (one day), in seconds.
pub const MAX_LEASE_TTL_S: u64 = 24 * 3600;

fn at_most(field: &'static str, value: u64, max: u64) -> Result<(), (&'static str, String)> {
    if value > max {
        return Err((field, format!("must be at most {max}, got {value}")));
    }
    Ok(())
}

impl TrainingSpec {
    /// Bounds every size and every product of sizes the job's buffers and counters are made
    /// of, so that none wraps around (`global_batch x seq_len` to 0 tokens per step) and no
    /// allocation is asked for more than a device could hold.
    fn check_sizes(&self) -> Result<(), (&'static str, String)> {
        at_most(
            "training.seq_len",
            u64::from(self.seq_len),
            u64::from(MAX_SEQ_LEN),
        )?;
        at_most("training.global_batch", self.global_batch, MAX_GLOBAL_BATCH)?;
        at_most("training.tokens", self.tokens, MAX_TOKENS)?;
        let window = u64::from(self.seq_len) + 1;
        let micro = self.micro_batch().min(self.global_batch);
        match micro.checked_mul(window) {
            Some(n) if n <= MAX_MICRO_BATCH_TOKENS => {}
            _ => {
                let field = if self.micro_batch.is_some() {
                    "training.micro_batch"
                } else {
                    "training.global_batch"
                };
                return Err((
                    field,
                    format!(
                        "{micro} samples of seq_len + 1 = {window} tokens per forward pass is more than {MAX_MICRO_BATCH_TOKENS}: set a smaller training.micro_batch (gradients accumulate over micro-batches)"
                    ),
                ));
            }
        }
        // Bounded above, so neither product can wrap; checked all the same.
        let per_step = self.global_batch.checked_mul(u64::from(self.seq_len));
        let budget = self.tokens.checked_add(per_step.unwrap_or(u64::MAX));
        if per_step.is_none() || budget.is_none() {
            return Err((
                "training.global_batch",
                "global_batch x seq_len overflows a 64-bit count of tokens".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "\
job: t
seed: 3
corpus:
  output: out
  sources:
    - name: pg
      role: domain
      paths: [docs]
      weight: 1
training:
  seq_len: 128
  global_batch: 16
  tokens: 100000
";

    #[test]
    fn parses_and_plans() {
        let spec = JobSpec::parse(JOB).expect("valid");
        let plan = spec.training.expect("training").plan();
        assert_eq!(plan.steps, 49); // ceil(100000 / 2048)
    }

    #[test]
    fn errors_name_field_and_line() {
        let err = JobSpec::parse(&JOB.replace("weight: 1", "weight: zero")).unwrap_err();
        assert!(
            err.contains("corpus.sources[0].weight") && err.contains("line 9"),
            "{err}"
        );
        let err = JobSpec::parse(&JOB.replace("seq_len: 128", "seq_len: 128\n  sequence: 3"))
            .unwrap_err();
        assert!(
            err.contains("unknown field `sequence`") && err.contains("line 12"),
            "{err}"
        );
        let err = JobSpec::parse(&JOB.replace("role: domain", "role: domian")).unwrap_err();
        assert!(
            err.contains("corpus.sources[0].role") && err.contains("line 7"),
            "{err}"
        );
    }

    #[test]
    fn load_resolves_paths_against_the_job_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.yaml");
        std::fs::write(&path, JOB).expect("write");
        let spec = JobSpec::load(&path).expect("load");
        let base = dir.path().canonicalize().expect("canonical");
        assert_eq!(spec.corpus.output, base.join("out"));
        assert_eq!(
            spec.corpus.sources()[0].paths[0],
            base.join("docs").to_string_lossy()
        );
        let err = JobSpec::load(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.yaml"), "{err}");
        std::fs::write(&path, JOB.replace("global_batch: 16", "global_batch: 0")).expect("write");
        let err = JobSpec::load(&path).unwrap_err().to_string();
        assert!(err.contains("training.global_batch"), "{err}");
    }
}
