//! The `corpus:` section of a job file.
//!
//! Checks that can be made on one value are made while deserializing (newtypes with
//! `try_from`), so serde_yaml reports them with the field's path, line and column, like any
//! other malformed value. Checks across values (unique names, at least one domain source) run in
//! the custom `Deserialize` of [`Sources`] for the same reason.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

/// Tokens per shard file when the job does not say.
pub const DEFAULT_SHARD_TOKENS: u64 = 64 * 1024 * 1024;
/// Vocabulary of the byte-level BPE trained when no tokenizer is given.
pub const DEFAULT_VOCAB_SIZE: u32 = 8192;
/// The default of `corpus.max_file_bytes` (1 GiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 30;
/// Field of a JSONL record that holds the text.
pub const DEFAULT_TEXT_FIELD: &str = "text";

/// Where the corpus comes from and where its shards go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    /// Output directory for shards, manifest, report and tokenizer (relative to the job file).
    #[serde(deserialize_with = "output_path")]
    pub output: PathBuf,
    /// A Hugging Face `tokenizer.json`, or a directory holding one (a model's folder). Without
    /// one, a byte-level BPE is trained on the corpus.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained tokenizer (ignored when `tokenizer` is given).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: VocabSize,
    /// End-of-document token; by default the first of the usual names the tokenizer knows.
    #[serde(default)]
    pub eos_token: Option<String>,
    /// Whether each document starts with a beginning-of-sequence token: `auto` (the default)
    /// does what the tokenizer's post-processor template does (or a `tokenizer_config.json`
    /// beside it, as transformers reads it), `true` always, `false` never.
    #[serde(default)]
    pub add_bos: AddBos,
    /// The token `add_bos: true` puts first when the tokenizer's template names none; by
    /// default the first of the usual names the tokenizer knows.
    #[serde(default)]
    pub bos_token: Option<String>,
    /// Target tokens per shard file (a shard closes at the first document boundary past it).
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: ShardTokens,
    /// The most bytes one input file may hold, after decompression: files are read whole, and
    /// a `.gz` can inflate a thousandfold. A file past it is an error naming it.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// The sources, in the order their shards and sample streams are numbered.
    pub sources: Sources,
}

/// One named source of text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Lowercase letters, digits, `-` and `_`: it names the source's shard directory.
    pub name: SourceName,
    /// `domain` text is what the job adapts to; `replay` text guards against forgetting.
    pub role: Role,
    /// Files, directories (walked recursively) or glob patterns, relative to the job file.
    pub paths: Vec<String>,
    /// Mixture weight; shares are weight / sum of weights. 0: the source is never sampled for
    /// training, but its held-out documents are still evaluated (a "0% replay" baseline that
    /// measures forgetting on the same documents as the runs that do mix it in).
    pub weight: Weight,
    /// Fraction of documents held out for evaluation, chosen by document hash.
    #[serde(default)]
    pub held_out: Fraction,
    /// JSONL field that holds the text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Encoding of the files that declare none (no byte order mark, and for HTML no `<meta>`
    /// charset): any WHATWG label (`windows-1252`, `iso-8859-2`, `shift_jis`, `gbk`, ...).
    /// Default UTF-8; bytes invalid in it are decoded lossily and the file is counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<EncodingLabel>,
    /// Which of `paths` are literal paths, not globs, whatever characters they hold (set by
    /// [`CorpusSpec::resolve_paths`]: a path is a glob only where the user's text has a
    /// wildcard and names no existing file); unset, a path with a wildcard is a glob.
    #[serde(skip)]
    pub literal: Vec<bool>,
}

/// A WHATWG encoding label, checked while deserializing so that a typo names its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodingLabel(&'static encoding_rs::Encoding);

impl EncodingLabel {
    pub fn get(self) -> &'static encoding_rs::Encoding {
        self.0
    }
}

impl Serialize for EncodingLabel {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for EncodingLabel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelVisitor;
        impl serde::de::Visitor<'_> for LabelVisitor {
            type Value = EncodingLabel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an encoding label")
            }
            fn visit_str<E: serde::de::Error>(self, label: &str) -> Result<EncodingLabel, E> {
                match encoding_rs::Encoding::for_label_no_replacement(label.as_bytes()) {
                    // The browsers' private-use mapping of bytes above 0x7F, not a text
                    // encoding: `caf\xe9` was stored as `caf\u{f7e9}`, without a word (an audit).
                    Some(encoding) if encoding == encoding_rs::X_USER_DEFINED => {
                        Err(E::custom(format!(
                            "`{label}` maps every byte above 0x7F to a private-use character, \
                             not to text: name the files' real encoding (e.g. windows-1252)"
                        )))
                    }
                    Some(encoding) => Ok(EncodingLabel(encoding)),
                    None => Err(E::custom(format!(
                        "`{label}` is not an encoding label of the WHATWG Encoding Standard \
                         (e.g. utf-8, windows-1252, iso-8859-2, shift_jis, gbk, utf-16le)"
                    ))),
                }
            }
        }
        deserializer.deserialize_str(LabelVisitor)
    }
}

/// `corpus.add_bos`: `auto`, `true` or `false`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AddBos {
    /// As the tokenizer's post-processor template says, or a `tokenizer_config.json` beside it.
    #[default]
    Auto,
    Always,
    Never,
}

impl Serialize for AddBos {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            AddBos::Auto => serializer.serialize_str("auto"),
            AddBos::Always => serializer.serialize_bool(true),
            AddBos::Never => serializer.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for AddBos {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AddBosVisitor;
        impl serde::de::Visitor<'_> for AddBosVisitor {
            type Value = AddBos;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`auto`, `true` or `false`")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<AddBos, E> {
                Ok(if v { AddBos::Always } else { AddBos::Never })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AddBos, E> {
                match v {
                    "auto" => Ok(AddBos::Auto),
                    "true" => Ok(AddBos::Always),
                    "false" => Ok(AddBos::Never),
                    other => Err(E::custom(format!(
                        "add_bos must be `auto`, `true` or `false`, got `{other}`"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(AddBosVisitor)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Domain,
    Replay,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Domain => "domain",
            Role::Replay => "replay",
        })
    }
}

/// The list of sources: non-empty, unique names, at least one domain source.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sources(pub Vec<SourceSpec>);

impl<'de> Deserialize<'de> for Sources {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Checked inside the sequence visitor, so that serde_yaml gives the list's line.
        struct SourcesVisitor;
        impl<'de> serde::de::Visitor<'de> for SourcesVisitor {
            type Value = Sources;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of sources")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Sources, A::Error> {
                use serde::de::Error;
                let mut sources: Vec<SourceSpec> = Vec::new();
                while let Some(source) = seq.next_element::<SourceSpec>()? {
                    let i = sources.len();
                    if sources.iter().any(|s| s.name == source.name) {
                        return Err(A::Error::custom(format!(
                            "sources[{i}]: the name `{}` is used twice",
                            source.name
                        )));
                    }
                    if let Some(j) = source.paths.iter().position(|p| p.trim().is_empty()) {
                        return Err(A::Error::custom(format!(
                            "sources[{i}] ({}): paths[{j}] is empty (it would name the job's \
                             whole folder: write `.` for that)",
                            source.name
                        )));
                    }
                    if source.paths.is_empty() {
                        return Err(A::Error::custom(format!(
                            "sources[{i}] ({}): `paths` is empty",
                            source.name
                        )));
                    }
                    sources.push(source);
                }
                if sources.is_empty() {
                    return Err(A::Error::custom("at least one source is needed"));
                }
                if !sources.iter().any(|s| s.role == Role::Domain) {
                    return Err(A::Error::custom("no source has `role: domain`"));
                }
                // A job trains on its domain: weight 0 everywhere there would leave nothing of
                // it to sample.
                if !sources
                    .iter()
                    .any(|s| s.role == Role::Domain && s.weight.get() > 0.0)
                {
                    return Err(A::Error::custom(
                        "every domain source has weight 0: at least one needs a weight above 0 \
                         (weight 0 only evaluates a source's held-out documents)",
                    ));
                }
                Ok(Sources(sources))
            }
        }
        deserializer.deserialize_seq(SourcesVisitor)
    }
}

/// Checks a number inside the deserializer's visitor, so that serde_yaml reports a bad value with
/// the field's own path, line and column (a `try_from` conversion would only get the enclosing
/// mapping's position).
struct NumberVisitor<T> {
    expecting: &'static str,
    check: fn(f64) -> Result<T, String>,
}

impl<'de, T> serde::de::Visitor<'de> for NumberVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
        (self.check)(v).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_f64(v as f64)
    }
}

fn whole(v: f64, what: &str) -> Result<f64, String> {
    if v.fract() == 0.0 {
        Ok(v)
    } else {
        Err(format!("{what} must be a whole number, got {v}"))
    }
}

macro_rules! checked_number {
    ($(#[$doc:meta])* $name:ident($inner:ty), $expecting:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Serialize, PartialEq, PartialOrd)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let check: fn(f64) -> Result<$name, String> = $check;
                deserializer.deserialize_any(NumberVisitor { expecting: $expecting, check })
            }
        }

        impl $name {
            pub fn get(self) -> $inner {
                self.0
            }
        }
    };
}

checked_number!(
    /// A mixture weight: finite and at least zero (0: evaluated, never trained on).
    Weight(f64),
    "a number >= 0",
    |w| if w.is_finite() && w >= 0.0 { Ok(Weight(w)) } else { Err(format!("weight must be a number >= 0, got {w}")) }
);
checked_number!(
    /// A held-out fraction in [0, 1).
    Fraction(f64),
    "a fraction in [0, 1)",
    |f| if (0.0..1.0).contains(&f) { Ok(Fraction(f)) } else { Err(format!("held_out must be in [0, 1), got {f}")) }
);
/// The largest vocabulary dapt takes, trained or supplied (ids 0 to 2^20 - 1; the largest in
/// use today are ~262 k).
pub const MAX_VOCAB_SIZE: u32 = 1 << 20;

checked_number!(
    /// A vocabulary size that a trained byte-level BPE can have (its 256-byte alphabet plus merges).
    VocabSize(u32),
    "a vocabulary size",
    |v| match whole(v, "vocab_size")? {
        v if (300.0..=MAX_VOCAB_SIZE as f64).contains(&v) => Ok(VocabSize(v as u32)),
        v => Err(format!("vocab_size must be between 300 and {MAX_VOCAB_SIZE}, got {v}")),
    }
);
checked_number!(
    /// Tokens per shard: at least 1024.
    ShardTokens(u64),
    "a number of tokens",
    |t| match whole(t, "shard_tokens")? {
        t if t >= 1024.0 => Ok(ShardTokens(t as u64)),
        t => Err(format!("shard_tokens must be at least 1024, got {t}")),
    }
);

impl Default for Fraction {
    fn default() -> Self {
        Fraction(0.0)
    }
}

/// A source name, usable as a directory name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Hash)]
pub struct SourceName(String);

impl<'de> Deserialize<'de> for SourceName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl serde::de::Visitor<'_> for NameVisitor {
            type Value = SourceName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a source name")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<SourceName, E> {
                SourceName::try_from(name.to_owned()).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

impl TryFrom<String> for SourceName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(SourceName(name))
        } else {
            Err(format!(
                "source name `{name}` must be 1-64 characters of a-z, 0-9, `-` and `_`"
            ))
        }
    }
}

impl SourceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn default_vocab_size() -> VocabSize {
    VocabSize(DEFAULT_VOCAB_SIZE)
}
fn default_shard_tokens() -> ShardTokens {
    ShardTokens(DEFAULT_SHARD_TOKENS)
}
fn default_max_file_bytes() -> u64 {
    DEFAULT_MAX_FILE_BYTES
}
fn default_text_field() -> String {
    DEFAULT_TEXT_FIELD.to_owned()
}

/// `corpus.output`: YAML's `~` and `null` are no folder name, and `~/x` is not expanded (no
/// shell reads the job file): each would make a folder literally named so.
fn output_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    use serde::de::Error;
    let text = Option::<String>::deserialize(d)?.unwrap_or_default();
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => Err(D::Error::custom(
            "`output` is empty: name the folder the corpus is written to",
        )),
        t if t.starts_with("~/") => Err(D::Error::custom(format!(
            "`output` {t}: `~` is not expanded in a job file: write the full path, or one \
             relative to the job file"
        ))),
        _ => Ok(PathBuf::from(text)),
    }
}

impl CorpusSpec {
    /// Makes every relative path (output, tokenizer, source paths) relative to `base` instead,
    /// normally the directory of the job file.
    pub fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &Path| {
            lexical_clean(&if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            })
        };
        self.output = join(&self.output);
        // A model's directory stands for its tokenizer.json, as transformers' from_pretrained
        // takes it (it was "not a regular file").
        self.tokenizer = self.tokenizer.as_deref().map(join).map(|p| {
            if p.is_dir() {
                p.join(crate::manifest::TOKENIZER_FILE)
            } else {
                p
            }
        });
        // A source path is a glob when the user's own text has a wildcard and no such path
        // exists as written (`notes [draft].txt`); the job folder's characters are never
        // wildcards (a job in `proj[v2]/` would match `projv/`), so they are escaped in a glob.
        let escape = |p: &Path| glob::Pattern::escape(&p.to_string_lossy());
        for source in &mut self.sources.0 {
            source.literal.clear();
            for pattern in &mut source.paths {
                let user = Path::new(pattern.as_str());
                let literal = join(user);
                let glob = crate::ingest::has_wildcards(pattern)
                    && std::fs::symlink_metadata(&literal).is_err();
                *pattern = match (glob, user.is_absolute()) {
                    (true, true) => pattern.clone(),
                    (true, false) => lexical_clean(&Path::new(&escape(base)).join(user))
                        .to_string_lossy()
                        .into_owned(),
                    (false, _) => literal.to_string_lossy().into_owned(),
                };
                source.literal.push(!glob);
            }
        }
    }

    pub fn sources(&self) -> &[SourceSpec] {
        &self.sources.0
    }
}

/// `p` relative to `base` (unless absolute), with `.` and `..` folded away lexically.
pub fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    lexical_clean(&if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    })
}

/// `a/b/../c` as `a/c`, without touching the file system (the path may not exist yet).
fn lexical_clean(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// What the job will read, for the report's epoch counts and held-out checks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrainingPlan {
    pub seq_len: u32,
    /// Samples per step (the global batch).
    pub global_batch: u64,
    pub steps: u64,
}

impl TrainingPlan {
    pub fn total_samples(&self) -> u64 {
        self.global_batch * self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<CorpusSpec, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    const GOOD: &str =
        "output: out\nsources:\n  - name: pg\n    role: domain\n    paths: [a]\n    weight: 1\n";

    #[test]
    fn an_output_of_null_or_tilde_is_refused_not_made_a_folder_of_that_name() {
        for output in ["~", "null", "\"\"", "~/corpora/x"] {
            let err = parse(&GOOD.replace("output: out", &format!("output: {output}")))
                .expect_err("refused");
            assert!(err.contains("`output`"), "{output}: {err}");
        }
        let err = parse(&GOOD.replace("output: out\n", "")).expect_err("refused");
        assert!(err.contains("output"), "{err}");
    }

    /// `tokenizer:` naming a model's folder is its tokenizer.json (it was refused as "not a
    /// regular file"); a file is kept as named.
    #[test]
    fn a_tokenizer_directory_is_its_tokenizer_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("model")).expect("mkdir");
        for (given, expected) in [
            ("model", "model/tokenizer.json"),
            ("model/", "model/tokenizer.json"),
            ("other.json", "other.json"),
        ] {
            let mut spec = parse(&format!("{GOOD}tokenizer: {given}\n")).expect("valid");
            spec.resolve_paths(dir.path());
            assert_eq!(spec.tokenizer, Some(dir.path().join(expected)), "{given}");
        }
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec = parse(GOOD).expect("valid");
        assert_eq!(spec.vocab_size.get(), DEFAULT_VOCAB_SIZE);
        assert_eq!(spec.sources()[0].text_field, "text");
        assert_eq!(spec.sources()[0].held_out.get(), 0.0);
    }

    #[test]
    fn negative_weight_names_field_and_line() {
        let err = parse(&GOOD.replace("weight: 1", "weight: -2.5")).unwrap_err();
        assert!(err.contains("sources[0].weight"), "{err}");
        assert!(err.contains("-2.5") && err.contains("line 6"), "{err}");
        assert!(err.contains(">= 0"), "{err}");
        let err = parse(&GOOD.replace("weight: 1", "weight: .nan")).unwrap_err();
        assert!(err.contains("sources[0].weight"), "{err}");
    }

    #[test]
    fn weight_zero_is_an_evaluation_only_source() {
        let replay = "  - name: general\n    role: replay\n    paths: [b]\n    weight: 0\n";
        let spec = parse(&format!("{GOOD}{replay}")).expect("weight 0 replay is valid");
        assert_eq!(spec.sources()[1].weight.get(), 0.0);
        // but the domain must be trained on
        let err = parse(&GOOD.replace("weight: 1", "weight: 0")).unwrap_err();
        assert!(err.contains("every domain source has weight 0"), "{err}");
        let err = parse(&format!(
            "{}{replay}",
            GOOD.replace("weight: 1", "weight: 0")
        ))
        .unwrap_err();
        assert!(err.contains("every domain source has weight 0"), "{err}");
    }

    #[test]
    fn unknown_field_is_refused_with_its_line() {
        let err = parse(&format!("{GOOD}    wieght: 3\n")).unwrap_err();
        assert!(err.contains("unknown field `wieght`"), "{err}");
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn duplicate_names_and_missing_domain_are_refused() {
        let two = format!("{GOOD}  - name: pg\n    role: replay\n    paths: [b]\n    weight: 1\n");
        let err = parse(&two).unwrap_err();
        assert!(
            err.contains("`pg` is used twice") && err.contains("line"),
            "{err}"
        );
        let err = parse(&GOOD.replace("domain", "replay")).unwrap_err();
        assert!(err.contains("role: domain"), "{err}");
    }

    #[test]
    fn encoding_labels_and_add_bos() {
        let spec = parse(&format!("{GOOD}    encoding: Latin1\n")).expect("valid");
        assert_eq!(
            spec.sources()[0].encoding.map(|e| e.get().name()),
            Some("windows-1252")
        );
        let err = parse(&format!("{GOOD}    encoding: x-user-defined\n")).unwrap_err();
        assert!(
            err.contains("sources[0].encoding") && err.contains("private-use"),
            "{err}"
        );
        let err = parse(&format!("{GOOD}    encoding: latin-9x\n")).unwrap_err();
        assert!(
            err.contains("sources[0].encoding") && err.contains("latin-9x"),
            "{err}"
        );
        assert_eq!(parse(GOOD).expect("valid").add_bos, AddBos::Auto);
        for (value, want) in [
            ("auto", AddBos::Auto),
            ("true", AddBos::Always),
            ("false", AddBos::Never),
        ] {
            let spec = parse(&format!("add_bos: {value}\n{GOOD}")).expect("valid");
            assert_eq!(spec.add_bos, want);
        }
        let err = parse(&format!("add_bos: maybe\n{GOOD}")).unwrap_err();
        assert!(err.contains("add_bos") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn bad_name_and_fraction_are_refused() {
        let err = parse(&GOOD.replace("name: pg", "name: Pg Docs")).unwrap_err();
        assert!(
            err.contains("sources[0].name") && err.contains("a-z"),
            "{err}"
        );
        let err = parse(&format!("{GOOD}    held_out: 1.5\n")).unwrap_err();
        assert!(err.contains("held_out must be in [0, 1)"), "{err}");
    }
}
