//! The fused attention ops on the GPU backend against the CPU reference (issue 12: to be filled).
