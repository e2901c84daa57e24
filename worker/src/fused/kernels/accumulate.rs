//! The CubeCL kernel for [`AccumulateOps`]: one unit per gradient element,
//! `acc[start + i] += f32(grad[i])`, in place on the f32 buffer, for the gradient's runtime
//! dtype (f32, f16, bf16), with 64-bit addresses when the buffer has more than 2^32 elements.

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::private;
use crate::fused::accumulate::AccumulateOps;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AccumulateOps
    for CubeBackend<R, F, I, BT>
{
    fn accumulate(acc: CubeTensor<R>, start: usize, grad: CubeTensor<R>) -> CubeTensor<R> {
        assert_eq!(acc.dtype, DType::F32, "accumulate: the buffer is f32");
        let grad = into_contiguous(grad);
        let n = grad.shape().num_elements();
        assert!(start + n <= acc.shape().num_elements(), "accumulate: range");
        let acc = private(acc);
        if n == 0 {
            return acc;
        }
        let client = acc.client.clone();
        let cube_dim = CubeDim::new(&client, n);
        let cube_count = calculate_cube_count_elemwise(&client, n, cube_dim);
        let dtype = grad.dtype;
        // 64-bit addresses where the buffer needs them (a 7B model's flat buffer has more than
        // 2^32 elements; cubecl's default is 32-bit).
        let address = acc
            .required_address_type()
            .max(grad.required_address_type());
        accumulate_kernel::launch::<R>(
            &client,
            cube_count,
            cube_dim,
            address,
            acc.clone().into_tensor_arg(),
            grad.into_tensor_arg(),
            start,
            dtype.into(),
        );
        acc
    }
}

#[cube(launch, address_type = "dynamic")]
fn accumulate_kernel<F: Float>(
    acc: &mut Tensor<f32>,
    grad: &Tensor<F>,
    start: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= grad.len() {
        terminate!();
    }
    acc[start + i] += f32::cast_from(grad[i]);
}

/// This module's kernel for a `dtype` gradient, with 32- and 64-bit addresses, as CUDA compile
/// tasks: see [`super::cuda_source`].
#[cfg(feature = "cuda")]
pub(super) fn cuda_tasks<R: Runtime>(
    client: &ComputeClient<R>,
    dtype: StorageType,
) -> Vec<super::cuda_source::CudaTask> {
    use super::cuda_source::{elementwise, task, tensor};
    [AddressType::U32, AddressType::U64]
        .into_iter()
        .map(|address| {
            task(
                format!("{address:?} addresses"),
                accumulate_kernel::AccumulateKernel::new(
                    elementwise().address_type(address),
                    client.clone(),
                    tensor(),
                    tensor(),
                    (),
                    dtype,
                ),
            )
        })
        .collect()
}
