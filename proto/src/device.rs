//! What `dapt launch` and `dapt-worker` both accept about the devices workers train on.

use std::fmt;
use std::str::FromStr;

/// The compute dtype of the forward and backward passes on a GPU (master weights, gradients
/// and optimizer state are f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 tensors; Burn's matmuls use TF32 tensor cores on Ampere and later.
    #[default]
    F32,
    /// bf16 activations and weight copies, f32 master weights and loss.
    Bf16,
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" | "tf32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision `{s}`: use f32 or bf16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// Dense (no sparsity) bf16 tensor-core peak, FLOP/s, of the GPUs dapt knows, by a word of the
/// name their driver reports (`NVIDIA H100 80GB HBM3`, `NVIDIA A100-SXM4-80GB`). `dapt plan`
/// plans with the same figures.
pub const PEAK_FLOPS: &[(&str, f64)] = &[("h100", 989e12), ("h200", 989e12), ("a100", 312e12)];

/// The dense bf16 peak of the GPU its driver calls `device_name`, if dapt knows it; the MFU in
/// the coordinator's step line is measured against it.
pub fn peak_flops(device_name: &str) -> Option<f64> {
    let name = device_name.to_ascii_lowercase();
    PEAK_FLOPS
        .iter()
        .find(|(gpu, _)| name.contains(gpu))
        .map(|&(_, peak)| peak)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peaks_by_driver_name() {
        assert_eq!(super::peak_flops("NVIDIA H200"), Some(989e12));
        assert_eq!(super::peak_flops("NVIDIA A100-SXM4-80GB"), Some(312e12));
        assert_eq!(super::peak_flops("NVIDIA GeForce RTX 4090"), None);
        assert_eq!(super::peak_flops("cpu"), None);
    }
}
