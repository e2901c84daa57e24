//! The model's matmuls as one op family, so that the CubeCL backends can run a named cubek
//! matmul strategy instead of the one Burn picks (issue 12: "fixed strategies chosen by
//! measurement").
//!
//! Burn 0.21's CUDA backend without its `autotune` feature runs every matmul as cubek's
//! `SimpleCyclicCmma` (no double buffering, no TMA); an H200 measured Burn's matmul at 77% of
//! the 1B step's GPU time, about 60 TFLOP/s (docs/benchmarks.md, 2026-11-29). Burn offers no
//! knob: its `float_matmul` always passes the default strategy. [`MatmulOps::matmul`] is the
//! backend's matmul with a choice: on the CubeCL backends it calls cubek's `launch_ref` with the
//! strategy `DAPT_MATMUL` names ([`MatmulChoice`]; `fused::kernels::matmul`), Burn's own
//! elsewhere. [`MatmulOps::linear`] is the model's projection `x W^T` as one autodiff node whose
//! backward runs the same matmuls (`dx = dy W`, `dW = dy^T x`, the latter written in `W`'s own
//! layout, where Burn's matmul node writes `(x^T dy)^T`, a transposed view). The blockwise
//! attention and the fused cross-entropy call [`MatmulOps::matmul`] for their products too.

use std::sync::OnceLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

/// Which matmul the CubeCL backends run (`DAPT_MATMUL`): Burn's own, or one of cubek 0.2's
/// strategies by name (cubek-matmul-0.2.0 `src/launch/strategy.rs`; the variants and arguments
/// are those Burn's autotune set benchmarks, burn-cubecl-0.21.0
/// `src/kernel/matmul/tune/base.rs`). `cmma` variants use the tensor cores through
/// `nvcuda::wmma`, `mma` ones through `mma.sync` (PTX); `tma` ones load tiles with the Hopper
/// tensor memory accelerator; `unit` ones run on the CUDA cores (and on lavapipe). A strategy
/// that cannot take a problem (cubek's `MatmulSetupError`: an unsupported layout, alignment or
/// size) falls back to Burn's matmul for that call, logged once per shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulChoice {
    /// `burn` (the default; also unset or empty): Burn's own choice (`SimpleCyclicCmma` in the
    /// `cuda` build, autotuned in the `cuda-autotune` build).
    Burn,
    SimpleCyclicCmma,
    SimpleCyclicMma,
    /// `multi_rows: true`.
    SimpleCyclicMmaMultiRow,
    DoubleCyclicCmma,
    DoubleCyclicMma,
    /// Double buffering with `specialized: true` (producer and consumer planes).
    DoubleCyclicMmaSpecialized,
    /// Burn's autotune arguments: `partition_k 2, row_count 8, rows_per_plane 2`.
    OrderedDoubleCmma,
    /// As [`MatmulChoice::OrderedDoubleCmma`] with `mma.sync`.
    OrderedDoubleMma,
    SpecializedCyclicMma,
    SimpleTmaMma,
    DoubleTmaMma,
    SpecializedTmaMma,
    SimpleUnit,
    DoubleUnit,
    /// `cublas`: NVIDIA's cuBLAS (`cublasGemmStridedBatchedEx`, the library PyTorch's matmuls
    /// run on; `fused::kernels::cublas`), CUDA only.
    Cublas,
}

impl MatmulChoice {
    /// Every choice, with its `DAPT_MATMUL` name.
    pub const ALL: [(MatmulChoice, &'static str); 16] = [
        (MatmulChoice::Burn, "burn"),
        (MatmulChoice::SimpleCyclicCmma, "simple-cyclic-cmma"),
        (MatmulChoice::SimpleCyclicMma, "simple-cyclic-mma"),
        (
            MatmulChoice::SimpleCyclicMmaMultiRow,
            "simple-cyclic-mma-multirow",
        ),
        (MatmulChoice::DoubleCyclicCmma, "double-cyclic-cmma"),
        (MatmulChoice::DoubleCyclicMma, "double-cyclic-mma"),
        (
            MatmulChoice::DoubleCyclicMmaSpecialized,
            "double-cyclic-mma-specialized",
        ),
        (MatmulChoice::OrderedDoubleCmma, "ordered-double-cmma"),
        (MatmulChoice::OrderedDoubleMma, "ordered-double-mma"),
        (MatmulChoice::SpecializedCyclicMma, "specialized-cyclic-mma"),
        (MatmulChoice::SimpleTmaMma, "simple-tma-mma"),
        (MatmulChoice::DoubleTmaMma, "double-tma-mma"),
        (MatmulChoice::SpecializedTmaMma, "specialized-tma-mma"),
        (MatmulChoice::SimpleUnit, "simple-unit"),
        (MatmulChoice::DoubleUnit, "double-unit"),
        (MatmulChoice::Cublas, "cublas"),
    ];

    /// Its `DAPT_MATMUL` name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map(|(_, n)| *n)
            .expect("every choice is in ALL")
    }

    /// The choice named `value` (`burn` for none or an empty one).
    ///
    /// # Errors
    /// An unknown name, with the known ones.
    pub fn parse(value: Option<&str>) -> Result<MatmulChoice, String> {
        let value = value.unwrap_or("").trim();
        if value.is_empty() {
            return Ok(MatmulChoice::Burn);
        }
        Self::ALL
            .iter()
            .find(|(_, n)| *n == value)
            .map(|(c, _)| *c)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                format!(
                    "DAPT_MATMUL={value:?}: expected one of {} (`burn`, the default, is Burn's own)",
                    names.join(", ")
                )
            })
    }
}

/// `DAPT_MATMUL` read ([`MatmulChoice::parse`]); the worker refuses a bad value at its start.
///
/// # Errors
/// An unknown name.
pub fn matmul_from_env() -> Result<MatmulChoice, String> {
    MatmulChoice::parse(std::env::var("DAPT_MATMUL").ok().as_deref())
}

/// The process's matmul choice: `DAPT_MATMUL`, read once and logged then (`burn` if it is bad;
/// the worker has refused a bad one before this is asked).
pub fn matmul_choice() -> MatmulChoice {
    static CHOICE: OnceLock<MatmulChoice> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let choice = matmul_from_env().unwrap_or(MatmulChoice::Burn);
        // (Asked on the CPU too, where it changes nothing: said only when it would.)
        if std::env::var_os("DAPT_MATMUL").is_some() {
            tracing::info!(matmul = choice.name(), "matmul on the GPU (DAPT_MATMUL)");
        } else {
            tracing::debug!(matmul = choice.name(), "matmul on the GPU (DAPT_MATMUL)");
        }
        choice
    })
}

/// The matmul op family of a backend. The default bodies are Burn's ops (the CPU backend's).
pub trait MatmulOps: Backend {
    /// `lhs [.., m, k] @ rhs [.., k, n]` -> `[.., m, n]` in `lhs`'s dtype, with equal batch
    /// dimensions (or Burn's broadcasting in the default body). Either side may be a
    /// transposed view (`swap_dims` of its last two dimensions).
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::matmul_by(matmul_choice(), lhs, rhs)
    }

    /// [`Self::matmul`] by `choice` rather than the process's `DAPT_MATMUL`. The CubeCL
    /// backends run the strategy and check each new problem (shapes, strides, dtype) once
    /// against Burn's matmul, which runs that problem from then on if the strategy refuses it
    /// or its result is wrong; other backends ignore `choice`.
    fn matmul_by(
        choice: MatmulChoice,
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let _ = choice;
        Self::float_matmul(lhs, rhs)
    }

    /// The projection `x [n, in] @ w^T` for a weight `w` `[out, in]` (Hugging Face layout):
    /// `[n, out]`.
    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::matmul(x, Self::float_transpose(w))
    }
}

impl MatmulOps for burn::backend::Flex {}

/// One graph node per projection; its backward runs the inner backend's [`MatmulOps::matmul`]
/// twice. `matmul` itself stays Burn's autodiff matmul (the model calls it only on inner
/// tensors, inside the fused attention and loss ops).
impl<B: MatmulOps, C: CheckpointStrategy> MatmulOps for Autodiff<B, C> {
    fn linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
        match LinearBackward
            .prepare::<C>([x.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            // As Burn's matmul node: each side is kept (through the checkpointer, which may
            // recompute it instead) only when the other side's gradient needs it.
            OpsKind::Tracked(mut prep) => {
                let x_state = w_tracked.then(|| prep.checkpoint(&x));
                let w_state = x_tracked.then(|| prep.checkpoint(&w));
                let y = <B as MatmulOps>::linear(x.primitive, w.primitive);
                prep.finish((x_state, w_state), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(<B as MatmulOps>::linear(x.primitive, w.primitive))
            }
        }
    }
}

/// The projection's node; its state is the checkpointed `x` (when `w` needs a gradient) and
/// `w` (when `x` does).
#[derive(Debug)]
struct LinearBackward;

impl<B: MatmulOps> Backward<B, 2> for LinearBackward {
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        let x = x.map(|id| checkpointer.retrieve_node_output::<FloatTensor<B>>(id));
        let w = w.map(|id| checkpointer.retrieve_node_output::<FloatTensor<B>>(id));
        if let (Some(node), Some(x)) = (node_w, x) {
            // dW [out, in] = dy^T [out, n] @ x [n, in]: in W's layout, no transposed view.
            let dy_t = B::float_swap_dims(dy.clone(), 0, 1);
            grads.register::<B>(node.id, B::matmul(dy_t, x));
        }
        if let (Some(node), Some(w)) = (node_x, w) {
            // dx [n, in] = dy [n, out] @ w [out, in].
            grads.register::<B>(node.id, B::matmul(dy, w));
        }
    }
}

/// [`MatmulOps::matmul`] on `Tensor`s: `lhs [.., m, k] @ rhs [.., k, n]`.
pub fn matmul<B: MatmulOps, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    let out = B::matmul(lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    debug_assert_eq!(out.shape().num_dims(), D);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// [`MatmulOps::linear`] on `Tensor`s: `x [n, in] @ w^T` for `w` `[out, in]`.
pub fn linear<B: MatmulOps>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(<B as MatmulOps>::linear(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
    )))
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    type Ad = Autodiff<Flex>;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for (choice, name) in MatmulChoice::ALL {
            assert_eq!(MatmulChoice::parse(Some(name)), Ok(choice));
            assert_eq!(choice.name(), name);
        }
        assert_eq!(MatmulChoice::parse(None), Ok(MatmulChoice::Burn));
        assert_eq!(MatmulChoice::parse(Some("")), Ok(MatmulChoice::Burn));
        let err = MatmulChoice::parse(Some("fastest")).unwrap_err();
        assert!(err.contains("DAPT_MATMUL=\"fastest\"") && err.contains("double-tma-mma"));
    }

    /// The projection's node gives Burn's matmul node's values and gradients, on odd shapes.
    #[test]
    fn linear_matches_burns_matmul_both_ways() {
        let device = Default::default();
        for (n, din, dout) in [(7, 5, 3), (33, 64, 17), (1, 9, 2)] {
            let x = Tensor::<Flex, 2>::random([n, din], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<Flex, 2>::random([dout, din], Distribution::Normal(0.0, 1.0), &device);
            let up = Tensor::<Flex, 2>::random([n, dout], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let xl = Tensor::<Ad, 2>::from_inner(x.clone()).require_grad();
                let wl = Tensor::<Ad, 2>::from_inner(w.clone()).require_grad();
                let y = if fused {
                    linear(xl.clone(), wl.clone())
                } else {
                    xl.clone().matmul(wl.clone().transpose())
                };
                let grads = (y.clone() * Tensor::from_inner(up.clone()))
                    .sum()
                    .backward();
                let dx = xl.grad(&grads).expect("dx");
                let dw = wl.grad(&grads).expect("dw");
                [y.inner(), dx, dw].map(|t| t.into_data().into_vec::<f32>().expect("f32"))
            };
            let (ours, burns) = (run(true), run(false));
            for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(ours.iter().zip(&burns)) {
                assert_eq!(a.len(), b.len());
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 0.1, "{what}: a test on near-zeros");
                let diff = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(diff <= 1e-5 * scale, "{what} at {n}x{din}->{dout}: {diff}");
            }
        }
    }

    /// Only the weight needs a gradient (a frozen input): dW alone, and right.
    #[test]
    fn linear_gives_the_weight_gradient_alone() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::from_floats([[1.0, 2.0], [3.0, -1.0]], &device);
        let w = Tensor::<Ad, 2>::from_floats([[0.5, -2.0], [1.5, 1.0], [0.0, 3.0]], &device)
            .require_grad();
        let y = linear(Tensor::<Ad, 2>::from_inner(x), w.clone());
        let grads = y.sum().backward();
        // dW[o, i] = sum over rows of x[r, i] (dy = 1): [4, 1] per output.
        let dw = w
            .grad(&grads)
            .expect("dw")
            .into_data()
            .into_vec::<f32>()
            .expect("f32");
        assert_eq!(dw, vec![4.0, 1.0, 4.0, 1.0, 4.0, 1.0]);
    }
}
