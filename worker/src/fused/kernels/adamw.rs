//! The CubeCL kernel for [`AdamwOps`]: one unit per element of the updated range, the moments
//! and the weight updated in place, with 64-bit addresses when a buffer has more than 2^32
//! elements.

use std::ops::Range;

use burn::tensor::DType;
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::private;
use crate::fused::adamw::{AdamwOps, AdamwStep};

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AdamwOps
    for CubeBackend<R, F, I, BT>
{
    fn adamw(
        weights: CubeTensor<R>,
        offset: usize,
        m: CubeTensor<R>,
        v: CubeTensor<R>,
        grads: CubeTensor<R>,
        range: Range<usize>,
        step: AdamwStep,
    ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        for (name, t) in [
            ("weights", &weights),
            ("m", &m),
            ("v", &v),
            ("grads", &grads),
        ] {
            assert_eq!(t.dtype, DType::F32, "adamw: {name} is f32");
        }
        let (weights, m, v) = (private(weights), private(m), private(v));
        let grads = into_contiguous(grads);
        let n = range.len();
        if n == 0 {
            return (weights, m, v);
        }
        let client = m.client.clone();
        let cube_dim = CubeDim::new(&client, n);
        let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
        let address = [&weights, &m, &v, &grads]
            .iter()
            .map(|t| t.required_address_type())
            .max()
            .expect("four buffers");
        adamw_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address,
            weights.clone().into_tensor_arg(),
            m.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            grads.into_tensor_arg(),
            offset + range.start,
            range.start,
            n,
            step.grad_scale,
            step.b1,
            step.one_minus_b1,
            step.b2,
            step.one_minus_b2,
            step.step_size,
            step.inv_bc2_sqrt,
            step.eps,
            step.decay,
        );
        (weights, m, v)
    }
}

/// `AdamwOps::adamw`'s formula for element `start + i`, `i < len`, of `m`, `v`, `grads` and
/// element `w_start + i` of `weights`, in [`AdamwOps::adamw`]'s operation order.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
fn adamw_kernel(
    weights: &mut Tensor<f32>,
    m: &mut Tensor<f32>,
    v: &mut Tensor<f32>,
    grads: &Tensor<f32>,
    w_start: usize,
    start: usize,
    len: usize,
    grad_scale: f32,
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    step_size: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    decay: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= len {
        terminate!();
    }
    let j = start + i;
    let g = grads[j] * grad_scale;
    let m_new = m[j] * b1 + g * one_minus_b1;
    let v_new = v[j] * b2 + (g * g) * one_minus_b2;
    m[j] = m_new;
    v[j] = v_new;
    let denom = v_new.sqrt() * inv_bc2_sqrt + eps;
    let k = w_start + i;
    let mut w = weights[k];
    w -= w * decay;
    w -= (m_new * step_size) / denom;
    weights[k] = w;
}

/// This module's kernel, with 32- and 64-bit addresses, as CUDA compile tasks (f32 only: the
/// buffers are f32 in every compute dtype): see [`super::cuda_source`].
#[cfg(feature = "cuda")]
pub(super) fn cuda_tasks<R: Runtime>(
    client: &ComputeClient<R>,
) -> Vec<super::cuda_source::CudaTask> {
    use super::cuda_source::{elementwise, task, tensor};
    [AddressType::U32, AddressType::U64]
        .into_iter()
        .map(|address| {
            task(
                format!("{address:?} addresses"),
                adamw_kernel::AdamwKernel::new(
                    elementwise().address_type(address),
                    client.clone(),
                    tensor(),
                    tensor(),
                    tensor(),
                    tensor(),
                    (),
                    (),
                    (),
                    (),
                    (),
                    (),
                    (),
                    (),
                    (),
                    (),
                    (),
                    (),
                ),
            )
        })
        .collect()
}
