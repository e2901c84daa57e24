//! [`NormOps`] on the CPU backend: the reference bodies, except RoPE in f32, which runs as one
//! pass over the rows. Written in tensor ops, RoPE from `[seq, head_dim]` tables broadcasts
//! in 4-D, which burn-flex runs through its generic strided iterator (see docs/benchmarks.md);
//! the loop below computes the same products and sums in the same order, so the numbers are
//! the reference's to the bit.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{TensorData, TensorMetadata};
use rayon::prelude::*;

use super::{reference, NormOps};

impl NormOps for Flex {
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        rope_f32(&x, &cos, &sin, heads)
            .unwrap_or_else(|| reference::rope::<Self>(x, cos, sin, heads))
    }
}

/// RoPE over contiguous f32 tensors (`None` for other dtypes or layouts).
fn rope_f32(
    x: &FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    heads: usize,
) -> Option<FlexTensor> {
    let (xs, cs, ss) = (
        x.as_slice::<f32>()?,
        cos.as_slice::<f32>()?,
        sin.as_slice::<f32>()?,
    );
    let [rows, width] = x.shape().dims();
    let [seq, hd] = cos.shape().dims();
    assert_eq!(width, heads * hd, "x is [batch * seq, heads * head_dim]");
    assert_eq!(rows % seq, 0, "x has whole sequences of the tables' length");
    let half = hd / 2;
    let mut out = vec![0.0f32; xs.len()];
    out.par_chunks_mut(width)
        .zip(xs.par_chunks(width))
        .enumerate()
        .with_min_len(16)
        .for_each(|(row, (y, x))| {
            let pos = (row % seq) * hd;
            let (c, s) = (&cs[pos..pos + hd], &ss[pos..pos + hd]);
            for (y, x) in y.chunks_exact_mut(hd).zip(x.chunks_exact(hd)) {
                let (x1, x2) = x.split_at(half);
                for j in 0..half {
                    y[j] = x1[j] * c[j] + -x2[j] * s[j];
                    y[half + j] = x2[j] * c[half + j] + x1[j] * s[half + j];
                }
            }
        });
    Some(FlexTensor::from_data(TensorData::new(out, [rows, width])))
}
