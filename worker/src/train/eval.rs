//! Held-out perplexity: the same code for in-training evaluation and `dapt eval`.
//!
//! A held-out stream is cut into consecutive windows of `seq_len + 1` tokens (stride `seq_len`,
//! so every token after the first is predicted exactly once), as many whole windows as fit in
//! `max_tokens` (at least one); the perplexity is `exp(mean next-token NLL)`.

use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use dapt_corpus::shards::TokenStream;
use serde::Serialize;

use crate::device::DeviceSpec;
use crate::error::{Result, WorkerError};
use crate::fused::FusedOps;
use crate::model::{Llama, LlamaConfig};
use crate::Cpu;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Perplexity {
    pub nll_sum: f64,
    pub tokens: u64,
}

impl Perplexity {
    /// Nats per predicted token.
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.tokens.max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Whether the mean NLL and the perplexity (its `exp`, which overflows above 709.78) are
    /// both finite.
    pub fn is_finite(&self) -> bool {
        self.mean_nll().is_finite() && self.perplexity().is_finite()
    }

    /// Refuses a perplexity that is not finite ([`WorkerError::NonFiniteEval`], naming
    /// `source` and the training `step`, if any): a mean NLL that is not, or one whose `exp`
    /// overflows (above 709.78). Serialised, it would read as a perplexity of null (an audit:
    /// `dapt eval` printed `"perplexity": null` for a finite mean NLL of 1229.67, exit 0), and
    /// the forgetting guard would compare against infinity.
    pub fn check_finite(&self, source: &str, step: Option<u64>) -> Result<()> {
        if self.is_finite() {
            return Ok(());
        }
        let mean_nll = self.mean_nll();
        Err(WorkerError::NonFiniteEval {
            source_name: source.to_owned(),
            step,
            mean_nll,
            tokens: self.tokens,
        })
    }
}

/// Perplexity of `stream` under the model, over at most `max_tokens` predicted tokens, in
/// batches of `batch` windows. `None` when the stream holds no complete window.
pub fn perplexity(
    config: &LlamaConfig,
    weights: &[f32],
    stream: &TokenStream,
    seq_len: u32,
    max_tokens: u64,
    batch: usize,
) -> Option<Perplexity> {
    if stream.windows(seq_len) == 0 {
        return None;
    }
    let model = Llama::<Cpu>::from_flat(config, weights, &Default::default(), false);
    perplexity_of(&model, stream, seq_len, max_tokens, batch)
}

/// [`perplexity`] on `device`: the CPU, or a GPU (with the `cuda` feature, after the checks of
/// `device::cuda_ready`; `vulkan` with the `wgpu` feature).
pub fn perplexity_on(
    device: DeviceSpec,
    config: &LlamaConfig,
    weights: &[f32],
    stream: &TokenStream,
    seq_len: u32,
    max_tokens: u64,
    batch: usize,
) -> Result<Option<Perplexity>> {
    match device {
        DeviceSpec::Cpu => Ok(perplexity(
            config, weights, stream, seq_len, max_tokens, batch,
        )),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(ordinal) => {
            crate::device::cuda_ready(ordinal)?;
            let device = burn::backend::cuda::CudaDevice::new(ordinal);
            let model = Llama::<crate::Gpu>::from_flat(config, weights, &device, false);
            Ok(perplexity_of(&model, stream, seq_len, max_tokens, batch))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(ordinal) => crate::device::cuda_ready(ordinal).map(|_| None),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Vulkan => {
            let device = Default::default();
            let model = Llama::<crate::Vulkan>::from_flat(config, weights, &device, false);
            Ok(perplexity_of(&model, stream, seq_len, max_tokens, batch))
        }
        #[cfg(not(feature = "wgpu"))]
        DeviceSpec::Vulkan => Err(crate::device::no_vulkan()),
    }
}

/// [`perplexity`] under a model already built, on any backend (the device-resident trainer
/// evaluates where its weights live).
pub fn perplexity_of<B: FusedOps>(
    model: &Llama<B>,
    stream: &TokenStream,
    seq_len: u32,
    max_tokens: u64,
    batch: usize,
) -> Option<Perplexity> {
    let windows = stream.eval_windows(seq_len, max_tokens);
    if windows == 0 {
        return None;
    }
    let device = model.device();
    let width = seq_len as usize + 1;
    let mut buf = vec![0u32; width];
    let mut nll_sum = 0.0;
    let mut w = 0;
    while w < windows {
        let n = (windows - w).min(batch.max(1) as u64) as usize;
        let mut ids = Vec::with_capacity(n * width);
        for j in 0..n as u64 {
            if let Err(e) = stream.read_window(w + j, seq_len, &mut buf) {
                // Callers check the windows first (`TokenStream::check_eval_windows`) to report
                // this as an error; here it can only end the evaluation.
                tracing::error!(error = %e, "held-out evaluation stopped");
                return None;
            }
            ids.extend(buf.iter().map(|&t| t as i64));
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, width]), device);
        nll_sum += model.nll_sum(ids).into_scalar().elem::<f64>();
        w += n as u64;
    }
    Some(Perplexity {
        nll_sum,
        tokens: windows * seq_len as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finite mean NLL whose `exp` overflows (1229.67 nats per token, from an audit's model
    /// with a scaled-up output head) is refused like a NaN one, not reported as a perplexity of
    /// null.
    #[test]
    fn a_perplexity_that_overflows_is_refused_like_a_nan_one() {
        let fine = Perplexity {
            nll_sum: 700.0 * 10.0,
            tokens: 10,
        };
        fine.check_finite("domain", None)
            .expect("exp(700) is finite");
        let overflowing = Perplexity {
            nll_sum: 1229.67 * 10.0,
            tokens: 10,
        };
        assert!(overflowing.mean_nll().is_finite());
        let err = overflowing
            .check_finite("domain", Some(40))
            .expect_err("an infinite perplexity")
            .to_string();
        assert!(
            err.contains("`domain`") && err.contains("1229.67") && err.contains("709.78"),
            "{err}"
        );
        let nan = Perplexity {
            nll_sum: f64::NAN,
            tokens: 10,
        };
        assert!(nan.check_finite("domain", None).is_err());
    }
}
