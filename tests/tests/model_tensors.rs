//! A model directory whose files hold tensors dapt's Llama does not use, over the real binaries:
//! `dapt eval` and `dapt train` refuse it and name the tensors (single file and sharded), and
//! accept the documented harmless extras (a rotary `inv_freq` buffer, a tied model's copy of the
//! embedding as `lm_head.weight`). The case `shared/cases/unused-bias-tensors` (a `llama` model
//! with Qwen2-style q/k/v biases) is one member of this kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dapt_tests::{dapt, f32_tensors_shaped, text, write_f32_tensors, write_job, Job};

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A prepared corpus and a tiny model trained one step on it (a checkpoint is a Hugging Face
/// directory), with its tensors.
fn corpus_and_model(dir: &Path) -> (Job, PathBuf, Tensors) {
    let job = write_job(dir, "base", 1, "");
    for args in [["prepare", "--quiet"].as_slice(), ["train"].as_slice()] {
        let out = dapt(
            &[args[0], &job.path.to_string_lossy()][..]
                .iter()
                .chain(&args[1..])
                .copied()
                .collect::<Vec<_>>(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let ck = job.checkpoints.join("step-00000001");
    let tensors = f32_tensors_shaped(&ck.join("model.safetensors")).expect("tensors");
    (job, ck, tensors)
}

/// A model directory `name` with `ck`'s config and tokenizer and `tensors`, in one file or in
/// `shards` files listed by a `model.safetensors.index.json`.
fn model_dir(dir: &Path, name: &str, ck: &Path, tensors: &Tensors, shards: usize) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).expect("dir");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(ck.join(f), out.join(f)).expect("copy");
    }
    if shards == 0 {
        write_f32_tensors(&out.join("model.safetensors"), tensors).expect("write");
        return out;
    }
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let part: Tensors = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        write_f32_tensors(&out.join(&file), &part).expect("shard");
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).expect("index");
    out
}

fn eval(model: &Path, job: &Job) -> std::process::Output {
    let corpus = job.path.parent().expect("dir").join("corpus");
    dapt(&[
        "eval",
        &model.to_string_lossy(),
        &corpus.to_string_lossy(),
        "--seq-len",
        "16",
        "--max-tokens",
        "64",
    ])
}

fn with(tensors: &Tensors, extra: &[(&str, Vec<usize>)]) -> Tensors {
    let mut t = tensors.clone();
    for (name, shape) in extra {
        let n = shape.iter().product();
        t.insert(name.to_string(), (shape.clone(), vec![0.01; n]));
    }
    t
}

#[test]
fn unused_tensors_are_refused_by_name_and_harmless_extras_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (job, ck, tensors) = corpus_and_model(dir.path());
    let q = tensors["model.layers.0.self_attn.q_proj.weight"].0[0];
    let kv = tensors["model.layers.0.self_attn.k_proj.weight"].0[0];
    let hidden = tensors["model.norm.weight"].0[0];

    // The case: Qwen2-style q/k/v biases in a `llama` checkpoint.
    let mut biases = Vec::new();
    for layer in 0..2 {
        for (part, n) in [("q", q), ("k", kv), ("v", kv)] {
            biases.push((
                format!("model.layers.{layer}.self_attn.{part}_proj.bias"),
                vec![n],
            ));
        }
    }
    let biases: Vec<(&str, Vec<usize>)> = biases
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    let model = model_dir(dir.path(), "biased", &ck, &with(&tensors, &biases), 0);
    let out = eval(&model, &job);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "evaluated a model without its biases"
    );
    assert!(
        stderr.contains("6 tensors that dapt's Llama does not use")
            && biases
                .iter()
                .all(|(n, _)| stderr.contains(&format!("`{n}`"))),
        "{stderr}"
    );
    // Training from it is refused the same way.
    let yaml = std::fs::read_to_string(&job.path).expect("job");
    let train_job = dir.path().join("from-hf.yaml");
    std::fs::write(
        &train_job,
        yaml.replace("preset: tiny", &format!("hf: {}", model.display()))
            .replace("ck-base", "ck-from-hf"),
    )
    .expect("job");
    let out = dapt(&["train", &train_job.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("model.layers.1.self_attn.v_proj.bias"),
        "{}",
        text(&out.stderr)
    );

    // Many: ten named, the rest counted; and found in any shard.
    let mut many = Vec::new();
    for layer in 0..2 {
        for part in [
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            many.push((format!("model.layers.{layer}.{part}.bias"), vec![hidden]));
        }
    }
    many.push(("vision_tower.patch_embed.weight".into(), vec![4, 4]));
    many.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        vec![4],
    ));
    many.extend(biases.iter().map(|(n, s)| (n.to_string(), s.clone())));
    let many: Vec<(&str, Vec<usize>)> = many.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    let model = model_dir(dir.path(), "sharded", &ck, &with(&tensors, &many), 3);
    let out = eval(&model, &job);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("15 tensors that dapt's Llama does not use")
            && stderr.contains("and 5 more")
            && !stderr.contains("inv_freq"),
        "{stderr}"
    );

    // Allowed: the rotary buffer (the frequencies config.json implies), and a tied model's
    // exact copy of its embedding.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).expect("config"))
            .expect("json");
    let theta = config["rope_theta"].as_f64().expect("rope_theta");
    let head_dim = config["head_dim"].as_u64().expect("head_dim") as usize;
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let mut fine = tensors.clone();
    for layer in 0..2 {
        fine.insert(
            format!("model.layers.{layer}.self_attn.rotary_emb.inv_freq"),
            (vec![inv_freq.len()], inv_freq.clone()),
        );
    }
    let embed = tensors["model.embed_tokens.weight"].clone();
    fine.insert("lm_head.weight".into(), embed.clone());
    let model = model_dir(dir.path(), "fine", &ck, &fine, 2);
    let out = eval(&model, &job);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A rotary buffer of other frequencies (another rope_theta) disagrees with config.json.
    let mut other_theta = fine.clone();
    let buffer = "model.layers.1.self_attn.rotary_emb.inv_freq";
    if let Some((_, values)) = other_theta.get_mut(buffer) {
        values.iter_mut().for_each(|v| *v = v.powf(1.2));
    }
    let model = model_dir(dir.path(), "other-theta", &ck, &other_theta, 0);
    let out = eval(&model, &job);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("tensor `{buffer}`"))
            && stderr.contains("RoPE inverse frequencies"),
        "{stderr}"
    );

    // A tied model whose lm_head differs from its embedding: which one is meant is unclear.
    let mut other = embed;
    other.1[0] += 1.0;
    fine.insert("lm_head.weight".into(), other);
    let model = model_dir(dir.path(), "two-heads", &ck, &fine, 0);
    let out = eval(&model, &job);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tensor `lm_head.weight`: differs from `model.embed_tokens.weight`"),
        "{stderr}"
    );
}

/// A base model (`model.hf`) whose tokenizer is not the corpus's is refused by `dapt prepare`
/// and `dapt launch` before any worker starts, naming both: every worker refused it, and the
/// launch went through four generations of "recovery" and 15 s before it failed (a new user's
/// walk-through). The same tokenizer passes.
#[test]
fn a_base_model_with_another_tokenizer_is_refused_before_any_worker_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (job, ck, tensors) = corpus_and_model(dir.path());
    let model = model_dir(dir.path(), "model", &ck, &tensors, 0);
    // Another tokenizer file: the same JSON, other bytes (so another SHA-256).
    let other = dir.path().join("other-tokenizer.json");
    let json = std::fs::read_to_string(model.join("tokenizer.json")).expect("tokenizer");
    std::fs::write(&other, format!("{json}\n")).expect("write");
    let yaml = std::fs::read_to_string(&job.path).expect("job");
    let from_model = |name: &str, extra: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        let text = yaml
            .replace("preset: tiny", &format!("hf: {}", model.display()))
            .replace("ck-base", &format!("ck-{name}"))
            .replace("corpus:\n", &format!("corpus:\n{extra}"));
        std::fs::write(&path, text).expect("job");
        path.to_string_lossy().into_owned()
    };
    // corpus.tokenizer names another file: refused before the corpus is touched.
    let given = from_model("given", &format!("  tokenizer: {}\n", other.display()));
    for args in [
        vec!["prepare", &given],
        vec!["launch", &given, "--workers", "2"],
    ] {
        let out = dapt(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains("is not model.hf's tokenizer")
                && stderr.contains("corpus.tokenizer")
                && !stderr.contains("recovery"),
            "{args:?}: {stderr}"
        );
    }
    // The corpus's own BPE (no corpus.tokenizer) against a model whose tokenizer differs.
    std::fs::write(model.join("tokenizer.json"), format!("{json}\n")).expect("write");
    let trained = from_model("trained", "");
    let out = dapt(&["launch", &trained, "--workers", "2"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the tokenizer of the corpus") && !stderr.contains("recovery"),
        "{stderr}"
    );
    // The model's own tokenizer: prepared and trained.
    std::fs::write(model.join("tokenizer.json"), &json).expect("write");
    let out = dapt(&["launch", &trained, "--workers", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
