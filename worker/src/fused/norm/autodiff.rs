//! [`NormOps`] on the autodiff backend: one graph node per op, whose backward calls the inner
//! backend's backward method (so a CubeCL inner backend runs its kernels both ways).
//!
//! Each node saves only what its backward reads: RMSNorm its input, gain and the f32 inverse
//! rms `[n]`; RoPE the two small tables; SwiGLU its two inputs. The ops are compute-bound
//! in the checkpointing sense: the state is kept, not recomputed.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;

use super::NormOps;

impl<B: NormOps, C: CheckpointStrategy> NormOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        match RmsNormBackward
            .prepare::<C>([x.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, inv_rms) =
                    B::rms_norm_forward(x.primitive.clone(), w.primitive.clone(), eps);
                prep.finish((x.primitive, w.primitive, inv_rms), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.primitive, w.primitive, eps)),
        }
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        // The tables are constants: no gradient flows to them.
        let y = B::rope(
            x.primitive,
            cos.primitive.clone(),
            sin.primitive.clone(),
            heads,
        );
        match RopeBackward
            .prepare::<C>([x.node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((cos.primitive, sin.primitive, heads), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwigluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::swiglu(gate.primitive.clone(), up.primitive.clone());
                prep.finish((gate.primitive, up.primitive), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.primitive, up.primitive)),
        }
    }
}

/// RMSNorm's node; its state is `(x, w, inv_rms)`.
#[derive(Debug)]
struct RmsNormBackward;

impl<B: NormOps> Backward<B, 2> for RmsNormBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, inv_rms) = ops.state;
        let (dx, dw) = B::rms_norm_backward(x, w, inv_rms, dy);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, dw);
        }
    }
}

/// RoPE's node; its state is `(cos, sin, heads)`. The backward pass is RoPE with `-sin`.
#[derive(Debug)]
struct RopeBackward;

impl<B: NormOps> Backward<B, 1> for RopeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (cos, sin, heads) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::rope(dy, cos, B::float_neg(sin), heads));
        }
    }
}

/// SwiGLU's node; its state is `(gate, up)`.
#[derive(Debug)]
struct SwigluBackward;

impl<B: NormOps> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (d_gate, d_up) = B::swiglu_backward(gate, up, dy);
        if let Some(node) = node_gate {
            grads.register::<B>(node.id, d_gate);
        }
        if let Some(node) = node_up {
            grads.register::<B>(node.id, d_up);
        }
    }
}
