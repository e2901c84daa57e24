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
