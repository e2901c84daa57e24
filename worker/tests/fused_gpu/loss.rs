//! The fused loss ops on the GPU backend against the CPU reference (issue 12: to be filled).
