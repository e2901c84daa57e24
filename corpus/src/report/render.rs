//! The corpus report as terminal tables.

use std::fmt::Write as _;

use super::Report;
use crate::tokenizer::BosFrom;

/// The report as terminal tables.
pub fn render(report: &Report) -> String {
    use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
    let mut out = String::new();
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "source",
        "role",
        "share",
        "files",
        "docs train/held",
        "dups",
        "tokens train",
        "tokens held",
        "bytes/tok",
        "tok/word",
        "epochs",
    ]);
    for r in &report.sources {
        table.add_row(vec![
            r.name.clone(),
            r.role.to_string(),
            format!("{:.3}", r.share),
            r.files.to_string(),
            format!("{}/{}", r.documents_train, r.documents_held_out),
            r.duplicates_removed.to_string(),
            r.tokens_train.to_string(),
            r.tokens_held_out.to_string(),
            format!("{:.2}", r.bytes_per_token),
            format!("{:.2}", r.tokens_per_word),
            r.epochs.map_or("-".into(), |e| format!("{e:.2}")),
        ]);
    }
    let _ = writeln!(out, "{table}");
    let t = &report.tokenizer;
    let _ =
        writeln!(
        out,
        "tokenizer: vocabulary {}, eos {}{}; frequent domain words take {:.2} pieces on average",
        t.vocab_size,
        t.eos_token,
        if t.trained { ", trained on this corpus" } else { "" },
        report.mean_pieces_frequent_domain_words
    );
    // A tokenizer_config.json key that transformers does not apply, beside the template's word.
    let ignored = match (t.bos_from, &t.bos_reason) {
        (BosFrom::Template | BosFrom::TemplateAddsNone | BosFrom::TemplateBosIsEos, Some(r)) => {
            format!("; {r}")
        }
        _ => String::new(),
    };
    let bos = match (&t.bos_token, t.bos_from) {
        (Some(bos), BosFrom::Template) => {
            format!("{bos} first (the tokenizer's template adds it{ignored})")
        }
        (Some(bos), BosFrom::TokenizerConfig) => format!(
            "{bos} first ({}; the tokenizer.json template adds none)",
            t.bos_reason.as_deref().unwrap_or("tokenizer_config.json")
        ),
        (None, BosFrom::TokenizerConfigSaysNo) => format!(
            "no BOS ({}; the tokenizer.json template adds one)",
            t.bos_reason.as_deref().unwrap_or("tokenizer_config.json")
        ),
        (None, BosFrom::TokenizerConfigBosIsEos) => format!(
            "no BOS ({} but its bos_token is {}, the EOS that already ends the document before)",
            t.bos_reason.as_deref().unwrap_or("tokenizer_config.json"),
            t.eos_token
        ),
        (Some(bos), _) => format!("{bos} first (corpus.add_bos: true)"),
        (None, BosFrom::JobSaysNo) => "no BOS (corpus.add_bos: false)".to_owned(),
        (None, BosFrom::TemplateBosIsEos) => format!(
            "no BOS (the tokenizer's template starts a sequence with {}, the EOS that already ends the document before{ignored})",
            t.eos_token
        ),
        (None, _) => format!("no BOS (the tokenizer's template adds none{ignored})"),
    };
    let _ = writeln!(
        out,
        "documents: {bos}, {} last; special tokens added: {}",
        t.eos_token,
        t.added_tokens.join(" ")
    );
    if !t.template_suffix_not_applied.is_empty() {
        let _ = writeln!(
            out,
            "note: the tokenizer's template ends a sequence with {}; dapt ends each document with {} alone",
            t.template_suffix_not_applied.join(" "),
            t.eos_token
        );
    }
    if !t.ignored_settings.is_empty() {
        let _ = writeln!(
            out,
            "note: the tokenizer file's {} settings were not applied (truncation and padding are for batched inference, BPE dropout for training a tokenizer): documents are encoded whole, the same way every time",
            t.ignored_settings.join(" and ")
        );
    }
    if !t.split_added_tokens.is_empty() {
        let _ = writeln!(
            out,
            "note: added tokens not marked special but shaped like control tokens are split in text like the special ones: {}",
            t.split_added_tokens.join(" ")
        );
    }
    // Each source's unknown tokens, when any: characters its vocabulary lacks, trained on as
    // the unknown token (a warning says so past 0.1% of a source's tokens).
    if let Some(unknown) = &t.unknown_token {
        let counts: Vec<String> = report
            .sources
            .iter()
            .filter(|r| r.unknown_tokens > 0)
            .map(|r| {
                let tokens = (r.tokens_train + r.tokens_held_out).max(1);
                format!(
                    "`{}` {} of {tokens} ({:.3}%), first in {}",
                    r.name,
                    r.unknown_tokens,
                    r.unknown_tokens as f64 * 100.0 / tokens as f64,
                    r.unknown_token_examples.join(", ")
                )
            })
            .collect();
        if !counts.is_empty() {
            let _ = writeln!(
                out,
                "unknown token {unknown} (characters outside the vocabulary): {}",
                counts.join("; ")
            );
        }
    }
    if let Some(p) = &report.plan {
        let _ = writeln!(
            out,
            "plan: {} steps x {} samples x {} tokens = {} training tokens",
            p.steps, p.global_batch, p.seq_len, p.training_tokens
        );
    }
    if !report.vocabulary_saturation.is_empty() {
        let words: Vec<String> = report
            .vocabulary_saturation
            .iter()
            .map(|w| format!("{} ({}x{})", w.word, w.pieces, w.count))
            .collect();
        let _ = writeln!(
            out,
            "split worst (word (pieces x count)): {}",
            words.join(", ")
        );
    }
    if !report.over_represented.is_empty() {
        let words: Vec<String> = report
            .over_represented
            .iter()
            .map(|w| format!("{} ({}/{})", w.word, w.domain_count, w.replay_count))
            .collect();
        let _ = writeln!(
            out,
            "domain vs replay (word (domain/replay count)): {}",
            words.join(", ")
        );
    }
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
