//! Checkpoints: everything needed to continue a run exactly, and nothing a later job could
//! mistake for a finished one.
//!
//! A checkpoint is a directory `step-00000042/` holding `model.safetensors` (weights under their
//! Hugging Face names, f32), `config.json` and `tokenizer.json` (so the directory is itself a
//! Hugging Face model that `dapt eval` and `dapt export` read), `optimizer.safetensors` (AdamW
//! moments), `trainer.json` (step, tokens, optimizer step count, seed) and `manifest.json` (size
//! and SHA-256 of every other file). It is written under a temporary name and renamed into
//! place; loading verifies every file first and names the one that does not match.
//!
//! Under ZeRO (`training.zero_stage` 1 or 2, more than one rank) the moments are not one
//! `optimizer.safetensors` but one shard file per rank, written by that rank ([`shards`]); a
//! rank of any later world size reads its own slice back from them.

pub mod shards;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use dapt_proto::checkpoint::{self as layout, CheckpointFile, CheckpointManifest};

use crate::error::{Result, WorkerError};
use crate::import::hf::{self, ExportDtype};
use crate::model::LlamaConfig;
use crate::train::Trainer;

pub use dapt_proto::checkpoint::MANIFEST_FILE;
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub use dapt_proto::checkpoint::TRAINER_FILE;

/// Where a run stands, besides weights and moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Steps completed; the next step to train is this one.
    pub step: u64,
    /// Tokens trained on (the LR schedule's clock).
    pub tokens: u64,
    /// AdamW's step count (bias correction).
    pub optimizer_steps: u64,
    /// The job's seed: the data order of the next step is `step_range(step, B)` under it.
    pub seed: u64,
    /// Steps passed over under `training.nonfinite: skip` (bounded over the whole job).
    #[serde(default)]
    pub skipped_steps: u64,
    /// The corpus trained on ([`dapt_corpus::Manifest::content_digest`]); absent in
    /// checkpoints written without a corpus (and before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corpus: Option<String>,
    /// The job's `training:` section it was trained under; absent in checkpoints written
    /// before it was recorded. A resume under other settings says which
    /// ([`dapt_proto::checkpoint::changed_training`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<dapt_proto::job::TrainingSpec>,
    /// The Hugging Face folder the job's model started from (its `model.hf`, canonical), absent
    /// for a preset and in checkpoints written before it was recorded: `dapt export` refuses to
    /// write over it ([`check_export_target`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<PathBuf>,
    /// The generation whose rank 0 wrote it (absent for `dapt train` and in checkpoints
    /// written before it was recorded): a rank of an older generation never replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The learning-rate re-warm the run is in, begun when it resumed under edited settings
    /// ([`dapt_proto::schedule::LrSchedule::resume`]); absent outside one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewarm: Option<dapt_proto::schedule::Rewarm>,
}

/// The base model's files that describe how it is used rather than what it computes, carried
/// from its Hugging Face folder into every checkpoint (listed and checksummed in the manifest)
/// and into an export: `generation_config.json` (the end tokens generation stops at, sampling
/// defaults), and, when the corpus's tokenizer is the base model's own (`tokenizer.json` byte for
/// byte), `tokenizer_config.json` (the chat template, the special tokens) and
/// `special_tokens_map.json`. Before, an export of a continued Llama-3.x-Instruct had neither its
/// chat template nor its stop tokens (an audit).
pub const BASE_FILES: [&str; 3] = dapt_proto::checkpoint::CARRIED_FILES;

/// The largest [`BASE_FILES`] file carried, in bytes (a chat template is tens of KiB).
pub const MAX_BASE_FILE_BYTES: u64 = 4 << 20;

/// The [`BASE_FILES`] of a job's base model, read once when a run starts (as the tokenizer is:
/// what the run trained with, not what the folder holds at save time).
#[derive(Debug, Clone, Default)]
pub struct BaseFiles {
    files: Vec<(&'static str, Vec<u8>)>,
}

impl BaseFiles {
    /// The files a run carries: those of the checkpoint it resumes from (`resumed`: verified
    /// with it, what the run started with), else `job`'s `model.hf` folder's that exist there,
    /// the tokenizer's two only when `tokenizer` (the corpus's, as the reader opened it) is the
    /// folder's `tokenizer.json`. A file that is not a JSON object, or is larger than
    /// [`MAX_BASE_FILE_BYTES`], is left out with a warning naming it: it changes nothing dapt
    /// computes.
    pub fn read(
        job: &dapt_proto::job::JobSpec,
        tokenizer: Option<&[u8]>,
        resumed: Option<&Path>,
    ) -> Self {
        if let Some(dir) = resumed {
            let files: Vec<(&'static str, Vec<u8>)> = BASE_FILES
                .iter()
                .filter_map(|&name| Some((name, std::fs::read(dir.join(name)).ok()?)))
                .collect();
            // A checkpoint written before they were carried has none: the folder's, if any.
            if !files.is_empty() {
                return BaseFiles { files };
            }
        }
        let Some(dir) = job.model.as_ref().and_then(|m| m.hf.as_deref()) else {
            return BaseFiles::default();
        };
        if !dir.is_dir() {
            tracing::warn!(
                model = %dir.display(),
                "the base model's folder cannot be read here: its generation_config.json and tokenizer_config.json are not carried into checkpoints and exports"
            );
            return BaseFiles::default();
        }
        let same_tokenizer = tokenizer
            .is_some_and(|t| std::fs::read(dir.join(hf::TOKENIZER_FILE)).is_ok_and(|b| b == t));
        let mut files = Vec::new();
        for name in BASE_FILES {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            if name != "generation_config.json" && !same_tokenizer {
                tracing::info!(
                    file = %path.display(),
                    "not carried into checkpoints and exports: the corpus's tokenizer is not this model folder's tokenizer.json"
                );
                continue;
            }
            let read = std::fs::metadata(&path)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    if m.len() > MAX_BASE_FILE_BYTES {
                        Err(format!(
                            "{} bytes, more than {MAX_BASE_FILE_BYTES}",
                            m.len()
                        ))
                    } else {
                        std::fs::read(&path).map_err(|e| e.to_string())
                    }
                })
                .and_then(
                    |bytes| match serde_json::from_slice::<serde_json::Value>(&bytes) {
                        Ok(serde_json::Value::Object(_)) => Ok(bytes),
                        Ok(_) => Err("not a JSON object".into()),
                        Err(e) => Err(format!("not JSON: {e}")),
                    },
                );
            match read {
                Ok(bytes) => files.push((name, bytes)),
                Err(e) => tracing::warn!(
                    file = %path.display(),
                    "not carried into checkpoints and exports: {e}"
                ),
            }
        }
        BaseFiles { files }
    }

    /// The files, by name.
    pub fn files(&self) -> &[(&'static str, Vec<u8>)] {
        &self.files
    }
}

/// What a checkpoint is trained from besides its steps: the corpus, whose tokenizer is copied
/// into the checkpoint and whose content digest is recorded in `trainer.json` (checked on resume
/// by [`check_corpus`]), and the job's initial Hugging Face model folder, recorded there too (an
/// export never goes over it: [`check_export_target`]).
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The corpus's `tokenizer.json` as the trainer opened it
    /// ([`dapt_corpus::CorpusReader::tokenizer_bytes`]), not as the file is at save time: the
    /// corpus may have been prepared again since (an audit: an export held a tokenizer of 1,500
    /// tokens for a model trained on one of 1,024).
    pub tokenizer: Option<&'a [u8]>,
    pub digest: &'a str,
    pub base_model: Option<&'a Path>,
    /// The base model's [`BASE_FILES`], written into the checkpoint beside its tokenizer.
    pub base_files: &'a [(&'static str, Vec<u8>)],
    /// The generation of the rank that writes (`None` for `dapt train`): the fencing token that
    /// keeps a stale rank 0 from replacing a newer generation's `step-N`.
    pub generation: Option<u64>,
}

impl<'a> Origin<'a> {
    /// The corpus `reader` opened, whose content digest is `digest`, and the model of `job`
    /// (its `model.hf`, if any).
    pub fn new(
        reader: &'a dapt_corpus::CorpusReader,
        digest: &'a str,
        job: &'a dapt_proto::job::JobSpec,
        base_files: &'a BaseFiles,
    ) -> Self {
        Origin {
            tokenizer: reader.tokenizer_bytes(),
            digest,
            base_model: job.model.as_ref().and_then(|m| m.hf.as_deref()),
            base_files: base_files.files(),
            generation: None,
        }
    }

    /// Written by a rank of `generation`.
    pub fn in_generation(self, generation: u64) -> Self {
        Origin {
            generation: Some(generation),
            ..self
        }
    }
}

/// Refuses to export `loaded` into `out` when `out` is (canonically: through a symlink, `..` or
/// a relative path) the folder its job's model started from: the export would replace the
/// model the job trains from (a stage trained from an earlier stage's export, exported back
/// over it) with what it made of it. Names both. A checkpoint that recorded no such folder (a
/// preset, or written before it was recorded) has nothing to refuse.
pub fn check_export_target(loaded: &Loaded, out: &Path) -> Result<()> {
    let Some(base) = &loaded.state.base_model else {
        return Ok(());
    };
    match (std::fs::canonicalize(out), std::fs::canonicalize(base)) {
        (Ok(a), Ok(b)) if a == b => Err(WorkerError::Invalid(format!(
            "output {} is the model checkpoint {} was trained from (its job's model.hf {}): \
             exporting there would replace the job's own base model; choose another output",
            out.display(),
            loaded.dir.display(),
            base.display()
        ))),
        _ => Ok(()),
    }
}

/// The checkpoint in `dir` was trained on the corpus of `digest`, or says nothing of its corpus.
///
/// # Errors
/// [`WorkerError::Checkpoint`] naming both digests when it was trained on another: the corpus
/// was prepared again (other documents, weights or tokenizer) since, and resuming would train
/// on other samples (or other token ids) under the same steps.
pub fn check_corpus(dir: &Path, digest: &str) -> Result<()> {
    let path = dir.join(TRAINER_FILE);
    let state: TrainerState = serde_json::from_slice(
        &std::fs::read(&path).map_err(WorkerError::io(&path))?,
    )
    .map_err(|e| WorkerError::Checkpoint {
        path: dir.to_path_buf(),
        message: format!("{TRAINER_FILE}: {e}"),
    })?;
    match state.corpus {
        Some(was) if was != digest => Err(WorkerError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "was trained on another corpus (content digest {was}) than the one at \
                 corpus.output now ({digest}): the corpus was prepared again since (other \
                 documents, weights or tokenizer); restore that corpus, or start the job in a \
                 new checkpoint.dir"
            ),
        }),
        _ => Ok(()),
    }
}

/// A verified checkpoint, read back.
pub struct Loaded {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub weights: Vec<f32>,
    /// The elements of the flat buffer `m` and `v` hold: all, or one rank's ZeRO slice.
    pub range: std::ops::Range<usize>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub state: TrainerState,
}

/// Where the AdamW moments of a checkpoint come from.
pub enum OptimizerFiles<'a> {
    /// The trainer's own, whole (`optimizer.safetensors`).
    Whole,
    /// One shard per rank of `world`, written by each rank into `staging`
    /// ([`shards::staging_dir`]) before rank 0 assembles the checkpoint.
    Shards { staging: &'a Path, world: usize },
}

pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(layout::step_dir_name(step))
}

/// Writes the trainer's checkpoint under `root` and returns its directory. Refuses, before
/// writing anything, weights or AdamW moments that are not all finite
/// ([`WorkerError::NonFiniteTensor`], naming the tensor): such a checkpoint would never be
/// good to resume, export or keep in place of a good one.
pub fn save(root: &Path, trainer: &Trainer, seed: u64, origin: Option<Origin>) -> Result<PathBuf> {
    save_with(root, trainer, seed, origin, OptimizerFiles::Whole)
}

/// [`save`] with the moments from `optimizer` (the ranks' shards under ZeRO). With
/// [`OptimizerFiles::Whole`] the trainer's optimizer must cover the whole buffer.
///
/// # Errors
/// Besides [`save`]'s: a shard that was not written ([`WorkerError::Checkpoint`], naming it).
pub fn save_with(
    root: &Path,
    trainer: &Trainer,
    seed: u64,
    origin: Option<Origin>,
    optimizer: OptimizerFiles,
) -> Result<PathBuf> {
    let tokenizer = origin.and_then(|o| o.tokenizer);
    let whole = matches!(optimizer, OptimizerFiles::Whole);
    if whole && trainer.optimizer.range != (0..trainer.layout.total) {
        return Err(WorkerError::Invalid(format!(
            "a whole optimizer file from a shard ({:?} of {} elements)",
            trainer.optimizer.range, trainer.layout.total
        )));
    }
    let params = &trainer.layout.params;
    // Shards were checked by the ranks that wrote them (`shards::write`).
    let moment_params: &[crate::model::ParamInfo] = if whole { params } else { &[] };
    let moment_names: Vec<(String, String)> = moment_params
        .iter()
        .map(|p| {
            (
                format!("exp_avg.{}", p.name),
                format!("exp_avg_sq.{}", p.name),
            )
        })
        .collect();
    let weights = params
        .iter()
        .map(|p| (p.name.as_str(), &trainer.weights[p.range()]));
    let moments = moment_params
        .iter()
        .zip(&moment_names)
        .flat_map(|(p, (m, v))| {
            [
                (m.as_str(), &trainer.optimizer.m[p.range()]),
                (v.as_str(), &trainer.optimizer.v[p.range()]),
            ]
        });
    hf::check_finite(&step_dir(root, trainer.step), weights.chain(moments))?;
    std::fs::create_dir_all(root).map_err(WorkerError::io(root))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-step-")
        .tempdir_in(root)
        .map_err(WorkerError::io(root))?;
    let dir = tmp.path();
    hf::write_dir(
        dir,
        &trainer.config,
        &trainer.layout,
        &trainer.weights,
        ExportDtype::F32,
    )?;
    match optimizer {
        OptimizerFiles::Whole => {
            let mut moments: Vec<(&str, &[usize], &[f32])> = Vec::new();
            for (p, (m_name, v_name)) in moment_params.iter().zip(&moment_names) {
                moments.push((m_name, &p.shape, &trainer.optimizer.m[p.range()]));
                moments.push((v_name, &p.shape, &trainer.optimizer.v[p.range()]));
            }
            hf::write_safetensors(&dir.join(OPTIMIZER_FILE), &moments, ExportDtype::F32, None)?;
        }
        OptimizerFiles::Shards { staging, world } => shards::gather_files(staging, dir, world)?,
    }
    let state = TrainerState {
        step: trainer.step,
        tokens: trainer.tokens,
        optimizer_steps: trainer.optimizer.t,
        seed,
        skipped_steps: trainer.skipped_steps,
        corpus: origin.map(|o| o.digest.to_owned()),
        training: Some(trainer.training),
        // Canonical, so that an export compares it with its output whatever the path given.
        base_model: origin
            .and_then(|o| o.base_model)
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())),
        generation: origin.and_then(|o| o.generation),
        rewarm: trainer.schedule.rewarm,
    };
    hf::write_atomic(&dir.join(TRAINER_FILE), &to_json(&state)?)?;
    if let Some(tokenizer) = tokenizer {
        hf::write_atomic(&dir.join(hf::TOKENIZER_FILE), tokenizer)?;
    }
    for (name, bytes) in origin.map_or(&[][..], |o| o.base_files) {
        hf::write_atomic(&dir.join(name), bytes)?;
    }
    let mut files = Vec::new();
    for name in hf::file_names(dir)? {
        let path = dir.join(&name);
        files.push(CheckpointFile {
            bytes: std::fs::metadata(&path)
                .map_err(WorkerError::io(&path))?
                .len(),
            sha256: dapt_corpus::tokenizer::sha256_file(&path)?,
            path: name,
        });
    }
    let manifest = CheckpointManifest {
        format_version: layout::FORMAT_VERSION,
        step: trainer.step,
        files,
    };
    hf::write_atomic(&dir.join(MANIFEST_FILE), &to_json(&manifest)?)?;
    let target = step_dir(root, trainer.step);
    if std::fs::symlink_metadata(&target).is_ok() {
        // A checkpoint of this step exists already (a rerun after a crash between rename and
        // the next step): replace it, but only if it is one of ours, and only its files.
        let existing = layout::identify(&target).ok_or_else(|| WorkerError::Checkpoint {
            path: target.clone(),
            message: format!(
                "exists and is not a dapt checkpoint (no {MANIFEST_FILE} of step {}): not replacing it; move it out of checkpoint.dir",
                trainer.step
            ),
        })?;
        // A rank of a generation that was replaced (stopped, then woken) must not replace what
        // the newer generation wrote, and may have committed (an audit).
        let written_by = std::fs::read(target.join(TRAINER_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<TrainerState>(&b).ok())
            .and_then(|s| s.generation);
        if let (Some(theirs), Some(ours)) = (written_by, state.generation) {
            if theirs > ours {
                return Err(WorkerError::Checkpoint {
                    path: target.clone(),
                    message: format!(
                        "was written by generation {theirs}, newer than this rank's {ours}: a \
                         stale rank does not replace it"
                    ),
                });
            }
        }
        layout::remove(&target, &existing).map_err(checkpoint_error)?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &target).map_err(WorkerError::io(&target))?;
    Ok(target)
}

/// Reads and verifies the checkpoint in `dir`, with the whole optimizer state.
pub fn load(dir: &Path) -> Result<Loaded> {
    load_part(dir, None)
}

/// Reads and verifies the checkpoint in `dir`; of the optimizer state only rank `r`'s ZeRO
/// slice of a `w`-way split when `shard` is `Some((r, w))`, whatever split wrote it (see
/// [`shards::read_moments`]). Every file is verified against the manifest before any is used:
/// a corrupt or missing shard is an error naming it.
pub fn load_part(dir: &Path, shard: Option<(usize, usize)>) -> Result<Loaded> {
    let fail = |message: String| WorkerError::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    let manifest = CheckpointManifest::read(dir).map_err(checkpoint_error)?;
    manifest.verify(dir).map_err(checkpoint_error)?;
    for needed in [hf::WEIGHTS_FILE, hf::CONFIG_FILE, TRAINER_FILE] {
        if !manifest.files.iter().any(|f| f.path == needed) {
            return Err(fail(format!("the manifest does not list {needed}")));
        }
    }
    let model = hf::load_dir(dir)?;
    let state: TrainerState = serde_json::from_slice(
        &std::fs::read(dir.join(TRAINER_FILE)).map_err(WorkerError::io(dir.join(TRAINER_FILE)))?,
    )
    .map_err(|e| fail(format!("{TRAINER_FILE}: {e}")))?;
    check_state(&state, manifest.step).map_err(|m| fail(format!("{TRAINER_FILE}: {m}")))?;
    let total = model.layout.total;
    let range = match shard {
        Some((rank, world)) => crate::collective::shard_range(total, world, rank),
        None => 0..total,
    };
    let (m, v) = shards::read_moments(dir, &manifest, &model.layout, range.clone())?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        config: model.config,
        weights: model.weights,
        range,
        m,
        v,
        state,
    })
}

/// Largest step and token count a checkpoint may record: far beyond any run (2^40 steps; 2^62
/// tokens), so that counting on from them cannot overflow.
const MAX_STEPS: u64 = 1 << 40;
const MAX_TOKENS: u64 = 1 << 62;

/// `state` agrees with the manifest's `step` and with itself: the same step, at most `step`
/// optimizer and skipped steps, counts within [`MAX_STEPS`] and [`MAX_TOKENS`] (a damaged or
/// edited `trainer.json` would otherwise resume at the wrong place or overflow a counter).
fn check_state(state: &TrainerState, step: u64) -> std::result::Result<(), String> {
    if state.step != step {
        return Err(format!(
            "step {} but the manifest's step is {step}",
            state.step
        ));
    }
    if state.step > MAX_STEPS || state.tokens > MAX_TOKENS {
        return Err(format!(
            "step {} and tokens {} are past any run (at most {MAX_STEPS} and {MAX_TOKENS})",
            state.step, state.tokens
        ));
    }
    for (field, value) in [
        ("optimizer_steps", state.optimizer_steps),
        ("skipped_steps", state.skipped_steps),
    ] {
        if value > state.step {
            return Err(format!(
                "{field} {value} is more than the step {}",
                state.step
            ));
        }
    }
    if let Some(r) = &state.rewarm {
        if !(r.from_lr.is_finite() && r.from_lr >= 0.0) || r.start > state.tokens {
            return Err(format!(
                "rewarm {r:?} is no re-warm of this run (a rate that is not a finite \
                 non-negative number, or a start past its {} tokens)",
                state.tokens
            ));
        }
    }
    Ok(())
}

/// The checkpoints under `root` (directories with a dapt checkpoint manifest of their step),
/// oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    Ok(layout::list(root)
        .into_iter()
        .map(|(step, dir, _)| (step, dir))
        .collect())
}

/// Deletes all but the newest `keep` checkpoints; nothing that is not a dapt checkpoint.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = layout::list(root);
    for (_, dir, manifest) in all.iter().take(all.len().saturating_sub(keep)) {
        if let Err(e) = layout::remove(dir, manifest) {
            // Someone put a file of theirs in it: it stays, and so does the checkpoint.
            tracing::warn!(checkpoint = %dir.display(), error = %e, "not pruning a checkpoint");
        }
    }
    Ok(())
}

fn checkpoint_error(e: layout::CheckpointError) -> WorkerError {
    WorkerError::Checkpoint {
        path: e.dir,
        message: e.message,
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| WorkerError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank 0 of a generation that was replaced while it was stopped wrote its stale
    /// `step-N` over the newer generation's committed one when it woke (an audit): the
    /// generation recorded in `trainer.json` fences it; the same or a newer one replaces.
    #[test]
    fn a_stale_generation_does_not_replace_a_newer_ones_checkpoint() {
        let spec = dapt_proto::job::JobSpec::parse(
            "job: t\nseed: 1\nmodel:\n  preset: tiny\ncorpus:\n  output: x\n  vocab_size: 512\n  sources:\n    - name: a\n      role: domain\n      paths: [\"x\"]\n      weight: 1\ntraining:\n  seq_len: 16\n  global_batch: 2\n  micro_batch: 1\n  tokens: 320\n  optimizer:\n    lr: 0.01\n",
        )
        .expect("job");
        let training = spec.training.expect("training");
        let config = crate::model::LlamaConfig::preset(dapt_proto::job::Preset::Tiny, 64);
        let weights = crate::model::ParamLayout::llama(&config).init(0.02, 7);
        let mut trainer = crate::train::Trainer::new(config, weights, &training);
        trainer.step = 10;
        let root = tempfile::tempdir().expect("tempdir");
        let origin = |g: u64| Origin {
            tokenizer: None,
            digest: "d",
            base_model: None,
            base_files: &[],
            generation: Some(g),
        };
        let dir = save(root.path(), &trainer, 1, Some(origin(3))).expect("generation 3");
        let written = std::fs::read(dir.join(hf::WEIGHTS_FILE)).expect("weights");
        let mut stale = trainer.clone();
        stale.weights[0] += 1.0;
        let err = save(root.path(), &stale, 1, Some(origin(2)))
            .expect_err("a stale generation")
            .to_string();
        assert!(
            err.contains("generation 3, newer than this rank's 2"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(dir.join(hf::WEIGHTS_FILE)).expect("weights"),
            written
        );
        save(root.path(), &stale, 1, Some(origin(4))).expect("a newer generation replaces");
        assert_ne!(
            std::fs::read(dir.join(hf::WEIGHTS_FILE)).expect("weights"),
            written
        );
    }

    #[test]
    fn a_trainer_state_that_disagrees_with_its_manifest_or_itself_is_refused() {
        let state = |step, tokens, optimizer_steps, skipped_steps| TrainerState {
            step,
            tokens,
            optimizer_steps,
            seed: 1,
            skipped_steps,
            corpus: None,
            training: None,
            base_model: None,
            generation: None,
            rewarm: None,
        };
        let with_rewarm = |from_lr, start| TrainerState {
            rewarm: Some(dapt_proto::schedule::Rewarm {
                start,
                from_lr,
                tokens: 512,
            }),
            ..state(20, 20 * 512, 19, 1)
        };
        check_state(&state(20, 20 * 512, 19, 1), 20).expect("a real one");
        check_state(&with_rewarm(1e-4, 10 * 512), 20).expect("a real re-warm");
        for (bad, field) in [
            (state(21, 512, 20, 0), "manifest"),
            (state(20, u64::MAX - 5, 20, 0), "tokens"),
            (state(u64::MAX, 512, 20, 0), "manifest"),
            (state(20, 512, u64::MAX, 0), "optimizer_steps"),
            (state(20, 512, 20, 21), "skipped_steps"),
            (with_rewarm(f64::NAN, 0), "rewarm"),
            (with_rewarm(-1e-3, 0), "rewarm"),
            (with_rewarm(1e-4, 20 * 512 + 1), "rewarm"),
        ] {
            let err = check_state(&bad, 20).expect_err("refused");
            assert!(err.contains(field), "{bad:?}: {err}");
        }
    }
}
