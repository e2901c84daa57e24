//! The resident trainer's device memory as CubeCL's allocator holds it: the model-sized flat
//! buffers (f32 weights, AdamW moments, gradients) at their own size
//! (`memory::allocate_persistent`), not in pages of the allocator's largest pool, and the
//! device's pages given back when the trainer is dropped (a generation's end).
//!
//! CubeCL's default pools on lavapipe (largest page 128 MiB, its biggest storage buffer) put a
//! request between 16 and 25.6 MiB into a 128 MiB page; the flat buffers here are ~22 MiB each,
//! so without the persistent allocation the three buffers of `from_host` reserve 128 MiB for
//! 66 MiB (on an H200 the 1B shape's 4.6 GiB buffers took a 35 GiB page the same way).

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::FloatDType;
use dapt_proto::job::{JobSpec, Preset};
use dapt_worker::memory::{DeviceMemory, DeviceMemoryUsage};
use dapt_worker::model::{LlamaConfig, ParamLayout};
use dapt_worker::train::resident::{train_step, ResidentTrainer};
use dapt_worker::train::{MicroBatch, Trainer};

use super::Gpu;

const MIB: u64 = 1 << 20;

fn usage(device: &burn::tensor::Device<Gpu>) -> DeviceMemoryUsage {
    Gpu::sync(device).expect("device sync");
    Gpu::device_memory(device).expect("a CubeCL device reports its memory")
}

#[test]
fn the_flat_buffers_take_their_own_size_and_go_back_with_the_trainer() {
    let spec = JobSpec::parse(
        "job: t\nseed: 1\nmodel:\n  preset: tiny\ncorpus:\n  output: x\n  vocab_size: 512\n  sources:\n    - name: a\n      role: domain\n      paths: [\"x\"]\n      weight: 1\ntraining:\n  seq_len: 16\n  global_batch: 2\n  micro_batch: 2\n  tokens: 640\n  optimizer:\n    lr: 0.01\n",
    )
    .expect("job");
    let training = spec.training.expect("training");
    // Tiny's shape with 30 layers: ~5.6 M parameters, 21 MiB per flat buffer, no parameter
    // above 1 MiB (the step's per-parameter gradients fall in small pages).
    let vocab = 512;
    let mut config = LlamaConfig::preset(Preset::Tiny, vocab);
    config.num_hidden_layers = 30;
    let layout = ParamLayout::llama(&config);
    let flat = (layout.total * 4) as u64;
    assert!(
        (16 * MIB..25 * MIB).contains(&flat),
        "{flat} bytes: not in the band that lavapipe's pools give a 128 MiB page"
    );
    let weights = layout.init(0.02, 7);
    let host = Trainer::new(config, weights, &training);

    let device = Default::default();
    let before = usage(&device);
    let mut trainer = ResidentTrainer::<Autodiff<Gpu>>::from_host(host, FloatDType::F32, &device);
    let held = usage(&device);
    let in_use = held.in_use - before.in_use;
    let reserved = held.reserved - before.reserved;
    assert!(
        in_use >= 3 * flat,
        "weights and two moments: {in_use} bytes in use"
    );
    assert!(
        reserved <= in_use + MIB,
        "{reserved} bytes reserved for {in_use} in use: the flat buffers sit in larger pages"
    );

    // A step: the gradient buffer (made every step) is exact as well, and what the passes
    // allocate beside it (activations and gradients of 16 tokens) is small at this shape.
    let ids: Vec<u32> = (0..2 * 17u32).map(|i| (i * 7919) % vocab as u32).collect();
    let micro = [MicroBatch { ids, samples: 2 }];
    let (loss, stats) = train_step(&mut trainer, None, &micro, 32.0, 32).expect("a step");
    assert!(loss.is_finite() && stats.applied, "{loss} {stats:?}");
    let stepped = usage(&device);
    let reserved = stepped.reserved - before.reserved;
    eprintln!(
        "flat buffer {flat} B; after from_host {in_use} B in use, {} B reserved; after a step {reserved} B reserved",
        held.reserved - before.reserved
    );
    assert!(
        reserved < 4 * flat + 40 * MIB,
        "after a step {reserved} bytes reserved for 4 flat buffers of {flat}"
    );

    // Dropped (a generation's end): the pages go back to the driver.
    drop(trainer);
    let after = usage(&device);
    assert!(
        after.reserved <= before.reserved + MIB,
        "{} bytes still reserved after the trainer (before it: {})",
        after.reserved,
        before.reserved
    );
}
