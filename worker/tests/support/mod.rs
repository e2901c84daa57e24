//! What several test binaries of the worker share (`mod support;`): a seeded generator and the
//! largest difference between two value lists.
#![allow(dead_code)] // each test binary uses part of it

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// A small xorshift generator, so inputs and weights are the same whatever crate versions are in
/// the build.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Roughly N(0, 1) (a sum of four uniforms), never exactly zero in practice.
    pub fn normal(&mut self) -> f32 {
        ((0..4).map(|_| self.uniform()).sum::<f64>() - 2.0) as f32 * 1.7
    }

    /// `n` values of [`Self::normal`] times `scale`.
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }

    /// A `[rows, cols]` tensor of [`Self::normal`] values on the default device.
    pub fn tensor<B: Backend>(&mut self, rows: usize, cols: usize) -> Tensor<B, 2> {
        let values = self.normals(rows * cols, 1.0);
        Tensor::from_data(TensorData::new(values, [rows, cols]), &Default::default())
    }

    /// `n` ids in `0..vocab`, the first and last id among them.
    pub fn targets(&mut self, n: usize, vocab: usize) -> Vec<i64> {
        let mut t: Vec<i64> = (0..n)
            .map(|_| (self.uniform() * vocab as f64) as i64 % vocab as i64)
            .collect();
        t[0] = vocab as i64 - 1;
        if n > 1 {
            t[n - 1] = 0;
        }
        t
    }
}

/// The largest absolute difference between `a` and `b` (same length).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
