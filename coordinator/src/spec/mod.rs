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
    /// Seed of the sample order (and, later, of initialisation and dropout).
    #[serde(default)]
    pub seed: u64,
    pub corpus: CorpusSpec,
    /// What the job will train on; used by `prepare` for epoch counts and held-out checks.
    #[serde(default)]
    pub training: Option<TrainingSpec>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    /// Tokens per sample fed to the model (a sample reads seq_len + 1 tokens).
    pub seq_len: u32,
    /// Samples per optimizer step, whatever the number of workers.
    pub global_batch: u64,
    /// Training budget in tokens; the job runs ceil(tokens / (global_batch * seq_len)) steps.
    pub tokens: u64,
}

impl TrainingSpec {
    pub fn plan(&self) -> TrainingPlan {
        let per_step = self.global_batch * self.seq_len as u64;
        TrainingPlan {
            seq_len: self.seq_len,
            global_batch: self.global_batch,
            steps: self.tokens.div_ceil(per_step.max(1)),
        }
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
        Ok(spec)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks across fields that deserialization cannot make.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.job.is_empty() {
            return Err(("job", "must not be empty".into()));
        }
        if let Some(t) = &self.training {
            if t.seq_len == 0 {
                return Err(("training.seq_len", "must be at least 1".into()));
            }
            if t.global_batch == 0 {
                return Err(("training.global_batch", "must be at least 1".into()));
            }
            if t.tokens == 0 {
                return Err(("training.tokens", "must be at least 1".into()));
            }
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
