//! ZeRO optimizer shards in a checkpoint, and resharding on load.
//!
//! Under `training.zero_stage` 1 or 2 with `w` ranks, each rank writes its own slice of the AdamW
//! moments (`collective::shard_range(total, w, rank)` of the flat buffer) as
//! `optimizer-RRRRR-of-WWWWW.safetensors`: two 1-D f32 tensors `exp_avg` and `exp_avg_sq`, with
//! the slice's offset, the buffer's total and the split in the safetensors metadata. Rank-writes
//! rather than rank 0 gathering: nothing travels over the ring, the ranks write in parallel, and
//! no rank ever holds the whole optimizer state (gathering it on rank 0 would put the memory that
//! ZeRO saves back on rank 0 at every checkpoint: 8 bytes per parameter, 56 GB for a 7B model).
//!
//! Each rank writes its shard into a staging folder of the generation and step
//! ([`staging_dir`]), the ranks meet at a barrier, and rank 0 moves every shard into the
//! checkpoint it is assembling; the checkpoint's manifest then covers the shards' sizes and
//! SHA-256 like every other file, and a missing shard fails the checkpoint (no commit).
//!
//! Loading reads, for a rank of any new world, exactly the elements of its new slice from the
//! shard files that overlap it ([`read_moments`]): the state after a re-formation with another
//! world size is element-wise the one committed. A whole `optimizer.safetensors` (stage 0, or
//! one rank) is read the same way, per tensor, so a job can change its `zero_stage` on resume.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use dapt_proto::checkpoint::CheckpointManifest;

use crate::collective::shard_range;
use crate::error::{Result, WorkerError};
use crate::import::hf::{self, ExportDtype};
use crate::model::ParamLayout;
use crate::train::optimizer::AdamW;

/// The name of `rank`'s shard file of a `world`-way split.
pub fn file_name(rank: usize, world: usize) -> String {
    format!("optimizer-{rank:05}-of-{world:05}.safetensors")
}

/// `(rank, world)` of a shard file name ([`file_name`]); None for any other name.
pub fn parse_name(name: &str) -> Option<(usize, usize)> {
    let rest = name
        .strip_prefix("optimizer-")?
        .strip_suffix(".safetensors")?;
    let (rank, world) = rest.split_once("-of-")?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(rank) || !digits(world) {
        return None;
    }
    let (rank, world) = (rank.parse().ok()?, world.parse().ok()?);
    (rank < world).then_some((rank, world))
}

/// Where the ranks of `generation` put their shards of the checkpoint of `step` before rank 0
/// moves them into it: a hidden folder under the checkpoint root, one per generation, so that a
/// rank of an older generation can never hand in a shard for a newer one.
pub fn staging_dir(root: &Path, generation: u64, step: u64) -> PathBuf {
    root.join(format!(
        "{}g{generation}-step-{step:08}",
        dapt_proto::checkpoint::ZERO_STAGING_PREFIX
    ))
}

/// Writes `optimizer`'s shard (rank `rank` of `world`) into `dir` and returns its SHA-256.
/// Refuses moments that are not all finite, naming the shard.
pub fn write(dir: &Path, optimizer: &AdamW, rank: usize, world: usize) -> Result<String> {
    let path = dir.join(file_name(rank, world));
    hf::check_finite(
        &path,
        [
            ("exp_avg", optimizer.m.as_slice()),
            ("exp_avg_sq", optimizer.v.as_slice()),
        ],
    )?;
    std::fs::create_dir_all(dir).map_err(WorkerError::io(dir))?;
    let len = [optimizer.m.len()];
    let metadata = BTreeMap::from([
        ("offset".to_string(), optimizer.range.start.to_string()),
        ("rank".to_string(), rank.to_string()),
        ("world".to_string(), world.to_string()),
    ]);
    hf::write_safetensors(
        &path,
        &[
            ("exp_avg", &len, &optimizer.m),
            ("exp_avg_sq", &len, &optimizer.v),
        ],
        ExportDtype::F32,
        Some(metadata),
    )?;
    Ok(dapt_corpus::tokenizer::sha256_file(&path)?)
}

/// Moves the `world` shard files from `staging` into `into` (rank 0, assembling the
/// checkpoint), then removes `staging` if nothing else is left in it. A shard that is not there
/// fails the checkpoint, naming it: a commit needs every shard.
pub fn gather_files(staging: &Path, into: &Path, world: usize) -> Result<()> {
    for rank in 0..world {
        let name = file_name(rank, world);
        let from = staging.join(&name);
        if !from.is_file() {
            return Err(WorkerError::Checkpoint {
                path: into.to_path_buf(),
                message: format!(
                    "rank {rank}'s optimizer shard {name} was not written to {}",
                    staging.display()
                ),
            });
        }
        std::fs::rename(&from, into.join(&name)).map_err(WorkerError::io(&from))?;
    }
    // Only an empty folder goes: anything else in it was not ours to delete.
    if let Err(e) = std::fs::remove_dir(staging) {
        tracing::warn!(dir = %staging.display(), error = %e, "shard staging folder left in place");
    }
    Ok(())
}

/// The AdamW moments of `range` of the flat buffer, read from the checkpoint in `dir` whose
/// manifest (already verified) is `manifest`: from the whole `optimizer.safetensors`, or from
/// the shard files of whatever world wrote them. Every element of `range` comes from exactly one
/// file, bit for bit.
///
/// # Errors
/// [`WorkerError::Checkpoint`] naming a shard the manifest does not list (of the split the
/// others say), shards of two splits, or a shard whose tensors do not fit its slice.
pub fn read_moments(
    dir: &Path,
    manifest: &CheckpointManifest,
    layout: &ParamLayout,
    range: Range<usize>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let fail = |message: String| WorkerError::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    let mut m = vec![0f32; range.len()];
    let mut v = vec![0f32; range.len()];
    let shards: Vec<(usize, usize)> = manifest
        .files
        .iter()
        .filter_map(|f| parse_name(&f.path))
        .collect();
    let whole = manifest
        .files
        .iter()
        .any(|f| f.path == super::OPTIMIZER_FILE);
    if whole {
        if !shards.is_empty() {
            return Err(fail(format!(
                "holds both {} and optimizer shards",
                super::OPTIMIZER_FILE
            )));
        }
        let pieces = layout.params.iter().map(|p| {
            (
                (
                    format!("exp_avg.{}", p.name),
                    format!("exp_avg_sq.{}", p.name),
                ),
                p.range(),
            )
        });
        let path = dir.join(super::OPTIMIZER_FILE);
        let bytes = read(&path)?;
        let st = parse(&path, &bytes)?;
        for ((m_name, v_name), slice) in pieces {
            if overlap(&slice, &range).is_empty() {
                continue;
            }
            copy_tensor(&st, &path, &m_name, &slice, &range, &mut m)?;
            copy_tensor(&st, &path, &v_name, &slice, &range, &mut v)?;
        }
        return Ok((m, v));
    }
    let Some(&(_, world)) = shards.first() else {
        return Err(fail(format!(
            "the manifest lists neither {} nor optimizer shards",
            super::OPTIMIZER_FILE
        )));
    };
    if let Some(&(_, other)) = shards.iter().find(|(_, w)| *w != world) {
        return Err(fail(format!(
            "the manifest lists optimizer shards of a {world}-way and a {other}-way split"
        )));
    }
    for rank in 0..world {
        if !shards.contains(&(rank, world)) {
            return Err(fail(format!(
                "optimizer shard {} is missing: the manifest does not list it",
                file_name(rank, world)
            )));
        }
    }
    for rank in 0..world {
        let slice = shard_range(layout.total, world, rank);
        if overlap(&slice, &range).is_empty() {
            continue;
        }
        let path = dir.join(file_name(rank, world));
        let bytes = read(&path)?;
        let st = parse(&path, &bytes)?;
        copy_tensor(&st, &path, "exp_avg", &slice, &range, &mut m)?;
        copy_tensor(&st, &path, "exp_avg_sq", &slice, &range, &mut v)?;
    }
    Ok((m, v))
}

fn overlap(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    a.start.max(b.start)..a.end.min(b.end).max(a.start.max(b.start))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(WorkerError::io(path))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<safetensors::SafeTensors<'a>> {
    safetensors::SafeTensors::deserialize(bytes).map_err(|e| WorkerError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Copies the part of f32 tensor `name` of `st` (read from `path`; the elements `slice` of the
/// flat buffer) that falls in `range` into `out` (which holds `range`), refusing values that
/// are not finite and, in a second moment (`exp_avg_sq*`), negative ones.
fn copy_tensor(
    st: &safetensors::SafeTensors,
    path: &Path,
    name: &str,
    slice: &Range<usize>,
    range: &Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    let view = st.tensor(name).map_err(|_| WorkerError::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        message: "missing".into(),
    })?;
    let data = view.data();
    if view.dtype() != safetensors::Dtype::F32 || data.len() != slice.len() * 4 {
        return Err(WorkerError::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            message: format!("expected {} f32 values", slice.len()),
        });
    }
    let both = overlap(slice, range);
    let from = &data[(both.start - slice.start) * 4..(both.end - slice.start) * 4];
    let to = &mut out[both.start - range.start..both.end - range.start];
    for (o, b) in to.iter_mut().zip(from.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    // Moments AdamW could never have written: a NaN or an infinity would make every later
    // update of these weights NaN, and so would a negative second moment (its square root).
    // Checked on the part this rank reads; the ranks together read all of it.
    let bad = to.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(WorkerError::NonFiniteTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            bad,
            len: to.len(),
            others: 0,
        });
    }
    let second_moment = name.starts_with("exp_avg_sq");
    let negative = to.iter().filter(|&&v| v < 0.0).count();
    if second_moment && negative > 0 {
        return Err(WorkerError::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            message: format!(
                "{negative} of {} values are negative; a second moment (a mean of squares) never is",
                to.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use dapt_proto::checkpoint::CheckpointFile;
    use dapt_proto::job::Preset;

    use super::*;
    use crate::model::LlamaConfig;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn manifest(files: &[&str]) -> CheckpointManifest {
        CheckpointManifest {
            format_version: 1,
            step: 1,
            files: files
                .iter()
                .map(|f| CheckpointFile {
                    path: (*f).to_owned(),
                    bytes: 0,
                    sha256: String::new(),
                })
                .collect(),
        }
    }

    /// Moments that AdamW could never have written (a NaN or an infinity; a negative second
    /// moment, a mean of squares) refuse the resume, naming the tensor and the file, in a
    /// whole `optimizer.safetensors` and in a ZeRO shard: resumed, they would turn every
    /// later update into NaN, or the square root of a negative number.
    #[test]
    fn non_finite_or_negative_moments_are_refused_by_tensor_and_file() -> TestResult {
        let layout = ParamLayout::llama(&LlamaConfig::preset(Preset::Tiny, 16));
        let total = layout.total;
        let dir = tempfile::tempdir()?;
        let p = &layout.params[3];
        let whole = super::super::OPTIMIZER_FILE;
        for (which, bad, expect) in [
            ("exp_avg", f32::NAN, "not finite"),
            ("exp_avg_sq", f32::INFINITY, "not finite"),
            ("exp_avg_sq", -1.0, "negative"),
        ] {
            let mut m = vec![0.1f32; total];
            let mut v = vec![0.1f32; total];
            match which {
                "exp_avg" => m[p.offset + 1] = bad,
                _ => v[p.offset + 1] = bad,
            }
            let names: Vec<(String, String)> = layout
                .params
                .iter()
                .map(|q| {
                    (
                        format!("exp_avg.{}", q.name),
                        format!("exp_avg_sq.{}", q.name),
                    )
                })
                .collect();
            let mut tensors: Vec<(&str, &[usize], &[f32])> = Vec::new();
            for (q, (m_name, v_name)) in layout.params.iter().zip(&names) {
                tensors.push((m_name, &q.shape, &m[q.range()]));
                tensors.push((v_name, &q.shape, &v[q.range()]));
            }
            hf::write_safetensors(&dir.path().join(whole), &tensors, ExportDtype::F32, None)?;
            let msg = read_moments(dir.path(), &manifest(&[whole]), &layout, 0..total)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                msg.contains(&format!("`{which}.{}`", p.name))
                    && msg.contains(whole)
                    && msg.contains(expect),
                "{which} {bad}: {msg}"
            );
        }

        // Rank 1's shard of a 2-way split, read by a rank whose slice overlaps it.
        let shards = tempfile::tempdir()?;
        for rank in 0..2 {
            let range = shard_range(total, 2, rank);
            let m = vec![0.1f32; range.len()];
            let mut v = vec![0.1f32; range.len()];
            if rank == 1 {
                v[2] = -0.5;
            }
            let len = [range.len()];
            hf::write_safetensors(
                &shards.path().join(file_name(rank, 2)),
                &[("exp_avg", &len, &m), ("exp_avg_sq", &len, &v)],
                ExportDtype::F32,
                None,
            )?;
        }
        let files = [file_name(0, 2), file_name(1, 2)];
        let listed = manifest(&[&files[0], &files[1]]);
        let msg = read_moments(shards.path(), &listed, &layout, 0..total)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("`exp_avg_sq`") && msg.contains(&files[1]) && msg.contains("negative"),
            "{msg}"
        );
        // A slice that does not reach the bad shard reads fine.
        read_moments(shards.path(), &listed, &layout, shard_range(total, 3, 0))?;
        Ok(())
    }
}
