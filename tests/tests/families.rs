//! Qwen2, Qwen3 and Mistral end to end over the real binaries: a tiny random model of each
//! family, written here as Hugging Face writes it (its own `config.json` fields and tensors),
//! trained by `dapt launch` with two workers on the quickstart corpus; the export is that
//! family's `config.json` and evaluates to the checkpoint's perplexity in `dapt eval`; and
//! `dapt plan` counts exactly the parameters of the weights file.

use std::path::{Path, PathBuf};
use std::process::Command;

use dapt_coordinator::plan;
use dapt_tests::{
    binary, dapt, events, f32_tensors, losses, serial, text, write_f32_tensors, write_job, Job,
    Proc, ShapedTensors, LONG,
};

/// A tiny model of `model_type`: 2 layers, hidden 64, 4 heads and 2 KV heads, MLP 128.
/// Qwen2: q/k/v biases, tied; Qwen3: q/k norms, head_dim 24 (not 64 / 4), untied; Mistral:
/// a sliding window of 16 positions under the job's 32.
fn model_dir(dir: &Path, model_type: &str, vocab: usize, tokenizer: &Path) -> PathBuf {
    let out = dir.join(format!("model-{model_type}"));
    std::fs::create_dir_all(&out).expect("dir");
    let (hidden, heads, kv, inter, layers) = (64usize, 4usize, 2usize, 128usize, 2usize);
    let head_dim = if model_type == "qwen3" { 24 } else { 16 };
    let tied = model_type == "qwen2";
    let mut config = serde_json::json!({
        "architectures": [match model_type {
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            _ => "MistralForCausalLM",
        }],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tied,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": true,
    });
    let extra = match model_type {
        "qwen2" => serde_json::json!({
            "use_sliding_window": false, "sliding_window": 32768, "max_window_layers": 2
        }),
        "qwen3" => serde_json::json!({
            "head_dim": head_dim, "attention_bias": false, "use_sliding_window": false,
            "sliding_window": null, "max_window_layers": 2
        }),
        _ => serde_json::json!({ "head_dim": head_dim, "sliding_window": 16 }),
    };
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    std::fs::write(out.join("config.json"), config.to_string()).expect("config");

    let mut state = 0x2545_F491_4F6C_DD1Du64 ^ vocab as u64 ^ model_type.len() as u64;
    let mut random = |shape: Vec<usize>, std: f32| {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 3.46 * std
            })
            .collect();
        (shape, values)
    };
    let ones = |n: usize| (vec![n], vec![1.0f32; n]);
    let (q, k) = (heads * head_dim, kv * head_dim);
    let mut t = ShapedTensors::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        random(vec![vocab, hidden], 0.02),
    );
    t.insert("model.norm.weight".into(), ones(hidden));
    if !tied {
        t.insert("lm_head.weight".into(), random(vec![vocab, hidden], 0.02));
    }
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let mut put = |name: &str, value| {
            t.insert(format!("{p}.{name}"), value);
        };
        put("input_layernorm.weight", ones(hidden));
        put("post_attention_layernorm.weight", ones(hidden));
        put("self_attn.q_proj.weight", random(vec![q, hidden], 0.02));
        put("self_attn.k_proj.weight", random(vec![k, hidden], 0.02));
        put("self_attn.v_proj.weight", random(vec![k, hidden], 0.02));
        put("self_attn.o_proj.weight", random(vec![hidden, q], 0.02));
        put("mlp.gate_proj.weight", random(vec![inter, hidden], 0.02));
        put("mlp.up_proj.weight", random(vec![inter, hidden], 0.02));
        put("mlp.down_proj.weight", random(vec![hidden, inter], 0.02));
        if model_type == "qwen2" {
            put("self_attn.q_proj.bias", random(vec![q], 0.1));
            put("self_attn.k_proj.bias", random(vec![k], 0.1));
            put("self_attn.v_proj.bias", random(vec![k], 0.1));
        }
        if model_type == "qwen3" {
            put("self_attn.q_norm.weight", ones(head_dim));
            put("self_attn.k_norm.weight", ones(head_dim));
        }
    }
    write_f32_tensors(&out.join("model.safetensors"), &t).expect("weights");
    std::fs::copy(tokenizer, out.join("tokenizer.json")).expect("tokenizer");
    out
}

/// `dapt eval`'s perplexity of every source, in order.
fn perplexities(model: &Path, corpus: &Path) -> Vec<f64> {
    let out = dapt(&[
        "eval",
        &model.to_string_lossy(),
        &corpus.to_string_lossy(),
        "--seq-len",
        "32",
        "--max-tokens",
        "512",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("eval json");
    assert!(!rows.is_empty(), "no source evaluated");
    rows.iter()
        .map(|r| r["perplexity"].as_f64().expect("perplexity"))
        .collect()
}

#[test]
fn launch_trains_each_family_with_two_workers_and_its_export_evaluates_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = write_job(dir.path(), "base", 3, "");
    let out = dapt(&["prepare", &base.path.to_string_lossy(), "--quiet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let corpus = dir.path().join("corpus");
    let manifest = dapt_corpus::Manifest::read(&corpus).expect("manifest");
    let vocab = manifest.tokenizer.vocab_size as usize;
    let yaml = std::fs::read_to_string(&base.path).expect("job");
    let _serial = serial();
    for model_type in ["qwen2", "qwen3", "mistral"] {
        let model = model_dir(
            dir.path(),
            model_type,
            vocab,
            &corpus.join(&manifest.tokenizer.file),
        );
        let path = dir.path().join(format!("{model_type}.yaml"));
        std::fs::write(
            &path,
            yaml.replace("job: base", &format!("job: {model_type}"))
                .replace("preset: tiny", &format!("hf: {}", model.display()))
                .replace("ck-base", &format!("ck-{model_type}")),
        )
        .expect("job");
        let job = Job {
            path,
            checkpoints: dir.path().join(format!("ck-{model_type}")),
            steps: base.steps,
        };

        // `dapt plan` counts the parameters of the weights file, exactly (its text rounds them
        // to billions, so ask its library for the count it plans with), and runs on the job.
        let values: usize = f32_tensors(&model.join("model.safetensors"))
            .expect("tensors")
            .values()
            .map(Vec::len)
            .sum();
        let spec = dapt_proto::job::JobSpec::load(&job.path).expect("job");
        // The count `plan::plan` multiplies into FLOPs and memory.
        let counted = plan::model_config(&spec).expect("config").num_params();
        assert_eq!(counted, values as u64, "{model_type}");
        let out = dapt(&["plan", &job.path.to_string_lossy()]);
        assert!(out.status.success(), "{}", text(&out.stderr));

        let mut cmd = Command::new(binary("dapt"));
        cmd.args(["--log-format", "json", "launch"])
            .arg(&job.path)
            .args(["--workers", "2"]);
        let mut proc = Proc::spawn(cmd);
        let (status, stdout) = proc.finish(LONG);
        assert!(
            status.success(),
            "{model_type}: {status}\n{}",
            proc.stderr()
        );
        let lines = proc.lines();
        assert_eq!(events(&lines, "generation formed")[0]["world"], 2);
        let losses = losses(&lines);
        assert_eq!(losses.len() as u64, job.steps, "{model_type}: {losses:?}");
        assert!(losses.iter().all(|(_, l)| l.is_finite()));
        assert!(stdout.contains("Hugging Face export"), "{stdout}");

        // The export is the family's own config.json, and the same model as the checkpoint.
        let export = job.checkpoints.join("export");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(export.join("config.json")).expect("export config"),
        )
        .expect("json");
        assert_eq!(config["model_type"], model_type, "{config}");
        let last = job.checkpoints.join(format!("step-{:08}", job.steps));
        let (from_checkpoint, from_export) =
            (perplexities(&last, &corpus), perplexities(&export, &corpus));
        println!("{model_type}: losses {losses:?}, perplexity {from_export:?}");
        assert_eq!(from_checkpoint, from_export, "{model_type}");
        // Training moved the model: the base model's perplexity differs.
        assert_ne!(perplexities(&model, &corpus), from_export, "{model_type}");
    }
}
