//! The job file: one YAML document, unknown fields refused, every error naming the field and
//! the line.

use std::path::{Path, PathBuf};

use dapt_corpus::{CorpusSpec, TrainingPlan};
use serde::{Deserialize, Deserializer, Serialize};

mod guard;
pub use guard::{GuardAction, GuardBound, GuardSpec, RebalanceSpec};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The I/O error is shown in the message, not chained as `source()` (it would print twice).
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// serde_yaml's message carries the field path, line and column.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}{}: {message}", line.map(|n| format!(" (line {n})")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        field: &'static str,
        /// The field's line in the file (1-based), when it is there ([`field_line`]).
        line: Option<usize>,
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
    /// The forgetting guard: bounds on held-out perplexity against the base model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardSpec>,
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
    #[serde(default = "default_init_std", deserialize_with = "finite")]
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
    /// ZeRO stage (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training
    /// Trillion Parameter Models"): `0` replicates the optimizer on every data-parallel rank;
    /// `1` shards the AdamW moments and f32 master weights across the ranks; `2` also shards the
    /// gradients (the device engine reduces them to their owners in buckets during the backward
    /// pass and keeps its slice only; the host engine reduce-scatters a whole buffer). Default 0.
    #[serde(default)]
    pub zero_stage: u8,
    /// Held-out perplexity every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// At most this many tokens of each held-out set per evaluation, in whole windows of
    /// `seq_len` (at least one).
    #[serde(default = "default_eval_tokens")]
    pub eval_tokens: u64,
    /// What a step whose loss or global gradient norm is not finite (NaN, ±inf) does: `stop`
    /// the job (the default) or `skip` the step. Such a step is never applied either way.
    #[serde(default)]
    pub nonfinite: NonFinite,
    /// With `nonfinite: skip`: the job stops once more than this many steps have been skipped
    /// (counted over the whole job, across restarts). Default 10.
    #[serde(default)]
    pub max_skipped_steps: Option<u64>,
}

/// What a step with a non-finite loss or gradient norm does (`training.nonfinite`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Stop the job with an error naming the step; nothing of the step is applied or committed.
    #[default]
    Stop,
    /// Pass over the step (its samples are not trained on, the weights and AdamW state stay as
    /// they were), up to `training.max_skipped_steps` times in the job.
    Skip,
}

/// `training.max_skipped_steps` when the job does not say.
pub const DEFAULT_MAX_SKIPPED_STEPS: u64 = 10;

/// AdamW with decoupled weight decay.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSpec {
    /// Peak learning rate, reached at the end of the warmup.
    #[serde(deserialize_with = "finite")]
    pub lr: f64,
    #[serde(deserialize_with = "finite_pair")]
    pub betas: (f64, f64),
    #[serde(deserialize_with = "finite")]
    pub eps: f64,
    /// Decoupled weight decay, applied to weight matrices; never to norms.
    #[serde(deserialize_with = "finite")]
    pub weight_decay: f64,
    /// Also decay the embedding (and untied output) matrices.
    pub decay_embeddings: bool,
    /// Clip the global gradient norm (over all parameters) to this; 0 disables.
    #[serde(deserialize_with = "finite")]
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
    #[serde(deserialize_with = "finite")]
    pub warmup: f64,
    /// The floor, as a fraction of the peak.
    #[serde(deserialize_with = "finite")]
    pub min_lr_ratio: f64,
    /// `wsd` only: fraction of the budget, at the end, spent decaying.
    #[serde(deserialize_with = "finite")]
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
    /// A step counts as stalled once it has taken this many times the median training time of
    /// the recent steps (and at least `stall_floor_ms`): the coordinator then names the rank or
    /// link that holds it (docs/control-plane.md#stall-detection).
    pub stall_factor: f64,
    /// The least time (milliseconds) a step may take before it counts as stalled.
    pub stall_floor_ms: u64,
    /// A stall that lasts this long (seconds) after it was named aborts the generation, which
    /// re-forms without the rank (or a link's sending end) that held it. 0: only name it.
    pub stall_timeout_s: u64,
    /// Where membership and the job's durable state live: `embedded` (the coordinator's
    /// process and files under checkpoint.dir; one machine) or `etcd` (needs `etcd:`).
    /// Default: `etcd` when an `etcd:` section is given, else `embedded`.
    pub membership: Option<MembershipKind>,
    pub etcd: Option<EtcdSpec>,
    /// TLS for the coordinator's gRPC endpoint and its `/metrics` (`dapt coordinator`; `dapt
    /// launch` serves its own workers on loopback without it). `dapt coordinator --tls-cert`,
    /// `--tls-key`, `--tls-client-ca` (or their `DAPT_TLS_*` variables) override these fields.
    pub tls: Option<CoordinatorTls>,
}

/// The coordinator's server certificate and, for mutual TLS, the CA of its clients' ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorTls {
    /// Certificate chain (PEM) the coordinator presents; it must name the host in the URL the
    /// workers use (or the name they give with `--coordinator-domain`).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) that signed the clients' certificates: with it, workers, `dapt status` and
    /// `/metrics` scrapers must present one (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// What errors call each file: the job file's fields, or the flags that gave them.
    #[serde(skip)]
    pub names: TlsFieldNames,
}

/// What errors about the coordinator's TLS files call them: `cluster.tls.cert` when the job
/// file gave the path, `--tls-cert` when the flag (or its variable) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsFieldNames {
    pub cert: &'static str,
    pub key: &'static str,
    pub client_ca: &'static str,
}

impl TlsFieldNames {
    /// The job file's fields.
    pub const JOB: TlsFieldNames = TlsFieldNames {
        cert: "cluster.tls.cert",
        key: "cluster.tls.key",
        client_ca: "cluster.tls.client_ca",
    };
    /// `dapt coordinator`'s flags.
    pub const FLAGS: TlsFieldNames = TlsFieldNames {
        cert: "--tls-cert",
        key: "--tls-key",
        client_ca: "--tls-client-ca",
    };
}

impl Default for TlsFieldNames {
    fn default() -> Self {
        TlsFieldNames::JOB
    }
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

    /// Which job the state under `<prefix>/<job>/` belongs to: name, token digest and
    /// checkpoint.dir (JSON; see `dapt_coordinator::identity`).
    pub fn identity(prefix: &str, job: &str) -> String {
        format!("{}identity", self::job(prefix, job))
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
            stall_factor: 5.0,
            stall_floor_ms: 30_000,
            stall_timeout_s: 60,
            membership: None,
            etcd: None,
            tls: None,
        }
    }
}

/// A float field of the job file, refused unless finite: YAML spells NaN and the infinities
/// `.nan`, `.inf` and `-.inf`, and none of them is a setting. Every `f64` of the job file is
/// read through this (or [`finite_pair`]), so that serde_yaml's error names the field, the line
/// and the column; [`JobSpec::validate`] checks the ranges (and finiteness again, for a spec
/// built in code).
fn finite<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Finite::deserialize(deserializer).map(|f| f.0)
}

/// A pair of floats (`betas`), each refused unless finite (see [`finite`]).
fn finite_pair<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(f64, f64), D::Error> {
    <(Finite, Finite)>::deserialize(deserializer).map(|(a, b)| (a.0, b.0))
}

/// A finite float, checked inside the deserializer's visitor: there serde_yaml still stands on
/// the value, so its error carries the field's own path, line and column (a check after
/// deserializing would get the enclosing mapping's).
struct Finite(f64);

impl<'de> Deserialize<'de> for Finite {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FiniteVisitor;
        impl serde::de::Visitor<'_> for FiniteVisitor {
            type Value = Finite;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a finite number")
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Finite, E> {
                if v.is_finite() {
                    Ok(Finite(v))
                } else {
                    Err(E::custom(format!("must be a finite number, got {v}")))
                }
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Finite, E> {
                Ok(Finite(v as f64))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Finite, E> {
                Ok(Finite(v as f64))
            }
        }
        deserializer.deserialize_f64(FiniteVisitor)
    }
}

/// Checks the float `field`: finite, and `in_range` (which `expected` describes).
fn number(
    field: &'static str,
    value: f64,
    in_range: impl Fn(f64) -> bool,
    expected: &str,
) -> Result<(), (&'static str, String)> {
    if value.is_finite() && in_range(value) {
        Ok(())
    } else {
        Err((field, format!("must be {expected}, got {value}")))
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

    /// Steps that `nonfinite: skip` may pass over in the whole job (0 with `stop`).
    pub fn max_skipped_steps(&self) -> u64 {
        match self.nonfinite {
            NonFinite::Stop => 0,
            NonFinite::Skip => self.max_skipped_steps.unwrap_or(DEFAULT_MAX_SKIPPED_STEPS),
        }
    }
}

/// The 1-based line of `field` (`checkpoint.every`, `corpus.sources[1].name`) in the YAML
/// `text`, found by its keys' indentation (block style; a key inside a flow mapping is not
/// found); `None` when it is not there (a default, or a check across several fields).
pub fn field_line(text: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    // The block being searched: lines after `from`, deeper than `parent` (-1: the whole file).
    let (mut from, mut parent) = (0usize, -1isize);
    // A list item's own line: at its parent's depth, yet inside the block.
    let mut item_line = None;
    let mut found = None;
    for segment in field.split('.') {
        let (key, index) = match segment.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(from) {
            if blank(line) {
                continue;
            }
            let depth = indent(line) as isize;
            if depth <= parent && item_line != Some(i) {
                break;
            }
            let body = line.trim_start();
            let (body, depth) = match body.strip_prefix("- ") {
                Some(rest) => (
                    rest.trim_start(),
                    depth + (body.len() - rest.trim_start().len()) as isize,
                ),
                None => (body, depth),
            };
            if depth > parent
                && body
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            {
                hit = Some((i, depth));
                break;
            }
        }
        let (i, depth) = hit?;
        found = Some(i);
        (from, parent, item_line) = (i + 1, depth, None);
        if let Some(n) = index {
            // The n-th `- ` item below the key (block style); a flow sequence is on its line.
            if lines[i].contains('[') {
                continue;
            }
            let item = lines
                .iter()
                .enumerate()
                .skip(i + 1)
                .filter(|(_, l)| !blank(l))
                .take_while(|(_, l)| indent(l) as isize > depth || l.trim_start().starts_with("- "))
                .filter(|(_, l)| l.trim_start().starts_with("- "))
                .nth(n)?;
            found = Some(item.0);
            (from, parent, item_line) = (item.0, indent(item.1) as isize, Some(item.0));
        }
    }
    found.map(|i| i + 1)
}

/// The largest job file read, in bytes: a job is a page of YAML.
pub const MAX_JOB_FILE_BYTES: u64 = 4 << 20;

/// The text of `path`, which must be a regular file (after symlinks) of at most `limit` bytes
/// and UTF-8: a FIFO would block the read, a device never end it. Errors say which.
pub fn read_small_file(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a directory, FIFO, socket or device)",
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB: not a file of this kind",
            limit >> 20
        )));
    }
    String::from_utf8(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

impl JobSpec {
    /// Reads and checks a job file; relative paths in it become relative to its directory.
    /// A job file that is not a regular file (a FIFO hung the read, `/dev/zero` filled memory;
    /// an audit) or past [`MAX_JOB_FILE_BYTES`] is refused before it is read.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let read_error = |error| SpecError::Read {
            path: path.to_path_buf(),
            error,
        };
        let text = read_small_file(path, MAX_JOB_FILE_BYTES).map_err(read_error)?;
        let mut spec = Self::parse(&text).map_err(|message| SpecError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        spec.validate()
            .map_err(|(field, message)| SpecError::Invalid {
                path: path.to_path_buf(),
                field,
                line: field_line(&text, field),
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
        // A repeated key is found first, so that the error points at the repeat's own line
        // (serde's `duplicate field` error would carry the enclosing mapping's line).
        serde::de::DeserializeSeed::deserialize(
            UniqueKeys,
            serde_yaml::Deserializer::from_str(text),
        )
        .map_err(|e| e.to_string())?;
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
        if let Some(tls) = self.cluster.tls.as_mut() {
            tls.cert = join(&tls.cert);
            tls.key = join(&tls.key);
            tls.client_ca = tls.client_ca.as_deref().map(join);
        }
    }

    /// Checks across fields that deserialization cannot make.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        // The name goes into etcd keys (`/` would reach into another job's), metric labels
        // (a quote, a backslash or a line break would end the label and forge lines) and log
        // lines. Anything else, spaces and non-ASCII letters included, was accepted before and
        // names existing checkpoints (`committed.json` keeps it), so it stays accepted.
        let forbidden = |c: char| c.is_control() || matches!(c, '/' | '\\' | '"' | '{' | '}');
        if self.job.trim().is_empty()
            || self.job.chars().count() > 128
            || self.job.starts_with('.')
            || self.job.contains(forbidden)
        {
            return Err((
                "job",
                format!(
                    "`{}` is not a job name: 1-128 characters, not starting with `.`, without `/`, `\\`, `\"`, `{{`, `}}` or control characters",
                    self.job.escape_debug()
                ),
            ));
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
        number(
            "cluster.stall_factor",
            c.stall_factor,
            |x| (1.0..=1e6).contains(&x),
            "between 1 and 1000000",
        )?;
        at_most("cluster.stall_floor_ms", c.stall_floor_ms, MAX_DURATION_MS)?;
        at_most(
            "cluster.stall_timeout_s",
            c.stall_timeout_s,
            MAX_DURATION_MS / 1000,
        )?;
        if let Some(m) = &self.model {
            // 0 makes every weight 0, and then every gradient: a model that never trains.
            number(
                "model.init_std",
                m.init_std,
                |x| (x as f32) > 0.0 && (x as f32).is_finite(),
                "positive, also once rounded to f32 (at least 1.4e-45)",
            )?;
        }
        if let Some(t) = &self.training {
            let o = &t.optimizer;
            // The optimizer computes in f32: a value that is in range as written but not once
            // rounded to f32 (a beta of 1 - 1e-8 is 1.0, an eps of 1e-46 is 0, an lr of 1e39
            // is infinite) is refused, not trained with (a beta of 1 froze a moment at 0: the
            // loss went to 4e7 and the run exited 0; an audit).
            let f32_too = |x: f64| (x as f32).is_finite();
            number(
                "training.optimizer.lr",
                o.lr,
                |x| (x as f32) > 0.0 && f32_too(x),
                "positive and finite, also once rounded to f32 (1.4e-45 to 3.4e38)",
            )?;
            let beta = |x: f64| (0.0..1.0).contains(&x) && (x as f32) < 1.0;
            let in_0_1 = "in [0, 1), also once rounded to f32 (at most 0.99999994)";
            number("training.optimizer.betas", o.betas.0, beta, in_0_1)?;
            number("training.optimizer.betas", o.betas.1, beta, in_0_1)?;
            number(
                "training.optimizer.eps",
                o.eps,
                |x| (x as f32) > 0.0 && f32_too(x),
                "positive, also once rounded to f32 (at least 1.4e-45)",
            )?;
            let at_least_0 = |x: f64| x >= 0.0;
            let weight_decay = o.weight_decay;
            // The optimizer applies `lr * weight_decay` in f32, as `w -= lr * wd * w` (AdamW's
            // decoupled decay): at 1 or more every step zeroes or flips each weight. A typo of
            // 1.0e4 for 1.0e-4 trained 60 steps into a model of uniform output, exit 0 (an audit).
            number(
                "training.optimizer.weight_decay",
                weight_decay,
                |x| at_least_0(x) && f32_too(x * o.lr),
                ">= 0, and times lr finite in f32",
            )?;
            let decay = weight_decay * o.lr;
            if decay >= 1.0 {
                // The typo is the larger of the two, as a rule (lr 3.0e4 for 3.0e-4).
                let field = if o.lr >= 1.0 {
                    "training.optimizer.lr"
                } else {
                    "training.optimizer.weight_decay"
                };
                return Err((
                    field,
                    format!(
                        "lr {} times weight_decay {weight_decay} is {decay}: each step would \
                         multiply every decayed weight by 1 - {decay} (AdamW's decoupled decay); \
                         it must be below 1 (the usual is around 1e-5: lr 3e-4, weight_decay 0.1)",
                        o.lr
                    ),
                ));
            }
            number(
                "training.optimizer.grad_clip",
                o.grad_clip,
                at_least_0,
                ">= 0 (0: off)",
            )?;
            let s = &t.schedule;
            let fraction = |x: f64| (0.0..=1.0).contains(&x);
            let in_0_1 = "a fraction in [0, 1]";
            number("training.schedule.warmup", s.warmup, fraction, in_0_1)?;
            number(
                "training.schedule.min_lr_ratio",
                s.min_lr_ratio,
                fraction,
                in_0_1,
            )?;
            number("training.schedule.decay", s.decay, fraction, in_0_1)?;
            if t.max_skipped_steps.is_some() && t.nonfinite != NonFinite::Skip {
                return Err((
                    "training.max_skipped_steps",
                    "only applies with `nonfinite: skip`".into(),
                ));
            }
            if t.micro_batch == Some(0) {
                return Err(("training.micro_batch", "must be at least 1".into()));
            }
            if t.zero_stage > 2 {
                return Err((
                    "training.zero_stage",
                    format!("{} is not a ZeRO stage dapt has: 0, 1 or 2", t.zero_stage),
                ));
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
        if let Some(guard) = &self.guard {
            guard.validate(self)?;
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

/// Walks a YAML document and refuses any mapping that repeats a key. The error is raised
/// while the repeated key itself is read, so serde_yaml gives it that key's line and column.
struct UniqueKeys;

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(UniqueKeys)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while map.next_key_seed(Key(&mut seen))?.is_some() {
            map.next_value_seed(UniqueKeys)?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag x`): the typed parse says what it makes of the tag.
        use serde::de::VariantAccess;
        let ((), variant) = data.variant_seed(UniqueKeys)?;
        variant.newtype_variant_seed(UniqueKeys)
    }
}

/// One mapping key, refused when the mapping already had it.
struct Key<'a>(&'a mut std::collections::HashSet<String>);

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Key<'_> {
    fn insert<E: serde::de::Error>(self, key: String) -> Result<(), E> {
        if self.0.insert(key.clone()) {
            Ok(())
        } else {
            Err(E::custom(format!(
                "duplicate key `{key}` (it was already given above in the same mapping)"
            )))
        }
    }
}

impl<'de> serde::de::Visitor<'de> for Key<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.insert(v.to_owned())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.insert(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.insert(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.insert(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.insert(v.to_string())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.insert("~".to_owned())
    }
    // A complex key (a mapping or list used as a key) is left to the typed parse.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        UniqueKeys.visit_seq(seq)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        UniqueKeys.visit_map(map)
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
    fn a_duplicate_key_is_named_at_its_own_line() {
        let job = "job: x\ncorpus:\n  output: out\n  sources:\n    - name: dom\n      role: domain\n      paths: [a]\n      weight: 1\n      weight: 2\n";
        let err = JobSpec::parse(job).unwrap_err();
        assert!(err.contains("duplicate key `weight`"), "{err}");
        assert!(err.contains("line 9"), "{err}");
        let err = JobSpec::parse("job: x\njob: y\n").unwrap_err();
        assert!(
            err.contains("duplicate key `job`") && err.contains("line 2"),
            "{err}"
        );
        // the same key in two different mappings is fine
        JobSpec::parse(JOB).expect("valid");
    }

    #[test]
    fn a_fields_line_is_found_by_its_keys() {
        assert_eq!(field_line(JOB, "job"), Some(1));
        let line = |key: &str| {
            JOB.lines()
                .position(|l| l.trim_start().starts_with(key))
                .map(|i| i + 1)
        };
        assert_eq!(field_line(JOB, "training.seq_len"), line("seq_len:"));
        assert_eq!(field_line(JOB, "corpus.sources[0].weight"), line("weight:"));
        assert_eq!(field_line(JOB, "corpus.sources[0].name"), line("- name:"));
        assert_eq!(field_line(JOB, "checkpoint.every"), None);
        let two =
            "a:\n  b: 1\nc:\n  xs:\n    - name: p\n      w: 1\n    - name: q\n      w: 2\n  b: 3\n";
        assert_eq!(field_line(two, "c.b"), Some(9));
        assert_eq!(field_line(two, "c.xs[1].w"), Some(8));
        assert_eq!(field_line(two, "c.xs[0].w"), Some(6));
        assert_eq!(field_line(two, "a.w"), None);
    }

    #[test]
    fn a_job_name_is_a_plain_name() {
        for bad in [
            "",
            "a/b",
            ".hidden",
            "x\"} 1\ndapt_phase{phase=\"failed\"} 1\n# ",
            "a\tb",
            "  ",
        ] {
            let job = JOB.replacen(
                "job: t",
                &format!("job: {}", serde_json::to_string(bad).expect("json")),
                1,
            );
            let spec = JobSpec::parse(&job).expect("parses");
            let (field, err) = spec.validate().expect_err("refused");
            assert!(
                field == "job" && err.contains("not a job name"),
                "{bad:?}: {err}"
            );
        }
        for good in [
            "quickstart",
            "llama2-7b_dapt.v2",
            "Run.3",
            "llama 7b",
            "run:1+lora",
            "médical",
        ] {
            let spec =
                JobSpec::parse(&JOB.replacen("job: t", &format!("job: {good}"), 1)).expect(good);
            spec.validate().expect(good);
        }
    }

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

    /// Every float of a job file, wherever it is, refused as `.nan`, `.inf` or `-.inf` with an
    /// error naming the field: the job is serialized with every field present, and each float
    /// in it is replaced in turn (so a float field added later is covered without a new test).
    #[test]
    fn every_float_field_refuses_non_finite_values() {
        let mut spec =
            JobSpec::parse(&JOB.replace("job: t", "job: t\nmodel: {preset: tiny}")).expect("valid");
        if let Some(t) = spec.training.as_mut() {
            t.nonfinite = NonFinite::Skip;
            t.max_skipped_steps = Some(3);
        }
        let full = serde_yaml::to_value(&spec).expect("serialize");
        fn floats(v: &serde_yaml::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            match v {
                serde_yaml::Value::Number(n) if n.is_f64() => out.push(path.clone()),
                serde_yaml::Value::Mapping(m) => {
                    for (k, v) in m {
                        path.push(k.as_str().unwrap_or("?").to_string());
                        floats(v, path, out);
                        path.pop();
                    }
                }
                serde_yaml::Value::Sequence(s) => {
                    for (i, v) in s.iter().enumerate() {
                        path.push(i.to_string());
                        floats(v, path, out);
                        path.pop();
                    }
                }
                _ => {}
            }
        }
        let mut paths = Vec::new();
        floats(&full, &mut Vec::new(), &mut paths);
        for must in [
            "lr",
            "weight_decay",
            "grad_clip",
            "eps",
            "warmup",
            "min_lr_ratio",
            "decay",
            "init_std",
            "weight",
        ] {
            assert!(
                paths
                    .iter()
                    .any(|p| p.last().map(String::as_str) == Some(must)),
                "{must} not among {paths:?}"
            );
        }
        for path in &paths {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let mut v = full.clone();
                let mut at = &mut v;
                for key in path {
                    at = match at {
                        serde_yaml::Value::Sequence(s) => {
                            &mut s[key.parse::<usize>().expect("index")]
                        }
                        other => other.get_mut(key.as_str()).expect("key"),
                    };
                }
                *at = serde_yaml::Value::from(bad);
                let text = serde_yaml::to_string(&v).expect("yaml");
                let field = path.last().expect("a leaf");
                let err = match JobSpec::parse(&text) {
                    Err(e) => e,
                    Ok(spec) => match spec.validate() {
                        Err((f, m)) => format!("{f}: {m}"),
                        Ok(()) => panic!("{path:?} = {bad} accepted"),
                    },
                };
                assert!(err.contains(field.as_str()), "{path:?} = {bad}: {err}");
            }
        }
        // Each element of `betas` too (a pair, not a float field of its own).
        for betas in ["[.nan, 0.95]", "[0.9, .inf]"] {
            let err = JobSpec::parse(&JOB.replace(
                "tokens: 100000",
                &format!("tokens: 100000\n  optimizer:\n    betas: {betas}"),
            ))
            .unwrap_err();
            assert!(err.contains("training.optimizer.betas"), "{err}");
        }
    }

    /// The optimizer computes in f32: values in range as written but not once rounded to f32
    /// (a beta of 1 - 1e-8 is 1.0: the second moment stayed 0 and the loss went to 4e7, exit 0;
    /// an audit) are refused by field, and so is an `init_std` of 0 (no gradient ever).
    #[test]
    fn optimizer_values_are_checked_as_the_optimizer_holds_them() {
        let optimizer = |body: &str| {
            let spec = JobSpec::parse(&JOB.replace(
                "tokens: 100000",
                &format!("tokens: 100000\n  optimizer:\n    {body}"),
            ))
            .expect("parses");
            spec.validate()
                .map_err(|(field, message)| format!("{field}: {message}"))
        };
        for (body, field) in [
            ("betas: [0.9, 0.99999999]", "training.optimizer.betas"),
            ("betas: [0.99999999, 0.95]", "training.optimizer.betas"),
            ("eps: 1.0e-46", "training.optimizer.eps"),
            ("lr: 1.0e+39", "training.optimizer.lr"),
            ("lr: 1.0e-46", "training.optimizer.lr"),
            (
                "weight_decay: 1.0e+38\n    lr: 10.0",
                "training.optimizer.weight_decay",
            ),
            // A typo of 1.0e4 for 1.0e-4: each step multiplied every weight by 1 - 3 = -2.
            (
                "weight_decay: 1.0e4\n    lr: 3.0e-4",
                "training.optimizer.weight_decay",
            ),
            // The case's lr typo, 3.0e4 for 3.0e-4, under the default weight_decay 0.1.
            ("lr: 3.0e4", "training.optimizer.lr"),
        ] {
            let err = optimizer(body).expect_err(body);
            assert!(err.starts_with(field), "{body}: {err}");
        }
        // The largest f32 below 1, and the smallest positive f32, are the optimizer's own.
        optimizer("betas: [0.9, 0.99999994]").expect("a beta f32 holds below 1");
        optimizer("eps: 1.5e-45").expect("a positive f32 eps");
        optimizer("weight_decay: 0.1\n    lr: 3.0e-4").expect("AdamW's usual");
        let spec = JobSpec::parse(&format!("{JOB}\nmodel:\n  preset: tiny\n  init_std: 0\n"))
            .expect("parses");
        assert_eq!(spec.validate().expect_err("init_std 0").0, "model.init_std");
        let spec = JobSpec::parse(&format!(
            "{JOB}\nmodel:\n  preset: tiny\n  init_std: 1.0e-50\n"
        ))
        .expect("parses");
        assert_eq!(spec.validate().expect_err("0 in f32").0, "model.init_std");
    }

    /// A job file that is a FIFO hung `dapt prepare`, `/dev/zero` filled memory (an audit):
    /// both refused at once, as is a file past the bound.
    #[test]
    fn a_job_file_that_is_not_a_regular_small_file_is_refused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("job.yaml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        for path in [fifo.as_path(), Path::new("/dev/zero"), dir.path()] {
            let err = JobSpec::load(path).expect_err("refused").to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_JOB_FILE_BYTES as usize + 1]).expect("write");
        let err = JobSpec::load(&big).expect_err("refused").to_string();
        assert!(err.contains("larger than 4 MiB"), "{err}");
    }

    #[test]
    fn nonfinite_policy_and_its_bound() {
        let with = |extra: &str| JOB.replace("tokens: 100000", &format!("tokens: 100000\n{extra}"));
        let spec = JobSpec::parse(JOB).expect("valid");
        let t = spec.training.expect("training");
        assert_eq!((t.nonfinite, t.max_skipped_steps()), (NonFinite::Stop, 0));
        let spec = JobSpec::parse(&with("  nonfinite: skip")).expect("valid");
        assert_eq!(
            spec.training.expect("training").max_skipped_steps(),
            DEFAULT_MAX_SKIPPED_STEPS
        );
        let spec =
            JobSpec::parse(&with("  nonfinite: stop\n  max_skipped_steps: 4")).expect("parse");
        let (field, _) = spec.validate().unwrap_err();
        assert_eq!(field, "training.max_skipped_steps");
        let err = JobSpec::parse(&with("  nonfinite: ignore")).unwrap_err();
        assert!(err.contains("training.nonfinite"), "{err}");
    }
}
