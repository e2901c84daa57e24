//! Text of an HTML page, through a real HTML5 parser (html5ever, via `scraper`).
//!
//! Navigation, scripts and styles are skipped; block elements become line breaks; whitespace
//! inside running text collapses as a browser would show it, but `<pre>` keeps its layout
//! (code blocks matter in technical documentation). DocBook's `navheader` / `navfooter`
//! (the PostgreSQL manual's page chrome) count as navigation.

use ego_tree::NodeRef;
use scraper::{Html, Node};

use super::xml_prolog;

/// Never shown, or shown only where something else is not (`noframes`, `noembed`: old Javadoc's
/// `index.html` held raw markup there, which html5ever reads as raw text). `title`, `rp` and
/// MathML's `annotation`/`annotation-xml` (the TeX source beside a rendered formula) are
/// `display: none` in browsers' default style sheet, wherever they are (an audit: a `<title>`
/// in the body, `x^{2}+1` beside `x2+1`, ruby's fallback parentheses were stored as text).
const SKIPPED: &[&str] = &[
    "head",
    "script",
    "style",
    "noscript",
    "template",
    "nav",
    "svg",
    "iframe",
    "object",
    "noframes",
    "noembed",
    "datalist",
    "title",
    "rp",
    "annotation",
    "annotation-xml",
];
/// Elements whose text keeps its layout (browsers' `white-space: pre`).
const PREFORMATTED: &[&str] = &["pre", "listing", "xmp", "plaintext", "textarea"];
/// Table cells: a tab between them, so that neighbouring cells' words never run together.
const CELLS: &[&str] = &["td", "th"];
const SKIPPED_CLASSES: &[&str] = &["navheader", "navfooter", "navigation"];
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "table",
    "tr",
    "blockquote",
    "section",
    "article",
    "header",
    "footer",
    "main",
    "aside",
    "figure",
    "figcaption",
    "hr",
    "caption",
    // Also shown as blocks by browsers (their default style sheet): their text ran together
    // with the next element's before (an audit: "Show the answerThe index is used.").
    "address",
    "center",
    "details",
    "summary",
    "dialog",
    "dir",
    "menu",
    "fieldset",
    "legend",
    "form",
    "hgroup",
    "search",
    "optgroup",
    "option",
    "listing",
    "xmp",
    "plaintext",
    "textarea",
];

/// The deepest element nesting a page may have. html5ever's tree builder searches its stack
/// of open elements for many tags, so its time grows with depth squared (100,000 nested
/// `<div>`s took minutes); browsers cap the tree at 512 levels (Blink), real pages stay far
/// below, so a page past this is generated junk or hostile.
pub const MAX_NESTING: usize = 4096;

/// How much of a page the parser is given at a time: between two pieces the depth of what it
/// holds open is measured, so a page past the limit stops within one piece (at most ~5,500
/// more elements, milliseconds of the parser's time) of the limit.
const PARSE_PIECE: usize = 16 << 10;

/// A page more deeply nested than the limit: how deep it was found to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep(pub usize);

/// The visible text of `html` (as [`extract_text`]), or [`TooDeep`] when its elements nest
/// more than `limit` deep.
pub fn page_text(html: &str, limit: usize) -> Result<String, TooDeep> {
    let document = parse_within_depth(html, limit)?;
    Ok(visible_text(document.tree.root(), html.len() / 2))
}

/// `html` parsed by html5ever, or [`TooDeep`]. The depth is the tree's own, as a browser
/// builds it (an `<a>` closes the open `<a>`, a `<p>` the open `<p>` and the formatting
/// elements inside it, at most three like formatting elements are reopened): while parsing,
/// the deepest element the parser holds (open, or to be reopened) is measured after each
/// piece of input, and the parse stops once it is past `limit`; then the finished tree's depth
/// is measured. Both walks are iterative.
///
/// Before, the depth was estimated from the tokens alone, and every start tag whose element
/// the tree builder closes by itself counted as nested: a legacy page of 4,100 unclosed
/// `<a name=...>` anchors, or of 5,000 paragraphs each opening a `<font>`, was refused as
/// nested 4,100 deep (an audit), though its tree is a few levels deep.
pub fn parse_within_depth(html: &str, limit: usize) -> Result<Html, TooDeep> {
    use html5ever::driver::{parse_document, ParseOpts};
    use html5ever::tendril::{StrTendril, TendrilSink};
    use html5ever::tree_builder::Tracer;
    use scraper::HtmlTreeSink;

    /// Collects the elements the tree builder holds: its stack of open elements and its list
    /// of active formatting elements (reopened where text follows).
    #[derive(Default)]
    struct Held(std::cell::RefCell<Vec<ego_tree::NodeId>>);
    impl Tracer for Held {
        type Handle = ego_tree::NodeId;
        fn trace_handle(&self, node: &ego_tree::NodeId) {
            self.0.borrow_mut().push(*node);
        }
    }

    let mut parser = parse_document(
        HtmlTreeSink::new(Html::new_document()),
        ParseOpts::default(),
    );
    let mut rest = html;
    while !rest.is_empty() {
        let mut cut = rest.len().min(PARSE_PIECE);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        parser.process(StrTendril::from(&rest[..cut]));
        rest = &rest[cut..];
        let held = Held::default();
        parser.tokenizer.sink.trace_handles(&held);
        let document = parser.tokenizer.sink.sink.0.borrow();
        let deepest = deepest_of(&document, &held.0.borrow());
        if deepest > limit {
            return Err(TooDeep(deepest));
        }
    }
    let document = parser.finish();
    match tree_depth(&document) {
        depth if depth > limit => Err(TooDeep(depth)),
        _ => Ok(document),
    }
}

/// The depth of the deepest of `nodes` (the root's children are at depth 1), each ancestor
/// visited once: the elements a parser holds are mostly one chain, so this costs the chain's
/// length, not its square.
fn deepest_of(document: &Html, nodes: &[ego_tree::NodeId]) -> usize {
    let mut depths = std::collections::HashMap::new();
    depths.insert(document.tree.root().id(), 0);
    let mut path = Vec::new();
    let mut deepest = 0;
    for &id in nodes {
        let mut node = document.tree.get(id);
        let known = loop {
            match node {
                Some(n) => match depths.get(&n.id()) {
                    Some(&depth) => break depth,
                    None => {
                        path.push(n.id());
                        node = n.parent();
                    }
                },
                // An element not in the document (created, not yet inserted) counts from itself.
                None => break 0,
            }
        };
        for (i, id) in path.drain(..).rev().enumerate() {
            depths.insert(id, known + i + 1);
        }
        deepest = deepest.max(depths.get(&id).copied().unwrap_or(0));
    }
    deepest
}

/// The depth of a parsed page's tree (the root's children are at depth 1), by an iterative
/// walk.
pub fn tree_depth(document: &Html) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(document.tree.root(), 0)];
    while let Some((node, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        stack.extend(NodeRef::children(&node).map(|child| (child, depth + 1)));
    }
    deepest
}

/// The visible text of `html`: a line per block, a blank line only where the page makes one
/// (`<br><br>`, preformatted text).
pub fn extract_text(html: &str) -> String {
    let document = Html::parse_document(html);
    visible_text(document.tree.root(), html.len() / 2)
}

/// Whether a page is XHTML, to be read as XML: a `.xhtml` file, or one that opens with an XML
/// declaration and whose root element is in the XHTML namespace, however long the comments
/// and declarations before it. Read as HTML5, its `<title/>`, `<script/>` or `<iframe/>` open
/// an element that swallows the rest of the page, and CDATA becomes a comment (an audit: EPUB
/// chapters lost all their text, without a word).
pub fn is_xhtml(path: &std::path::Path, text: &str) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("xhtml"))
        || (xml_prolog::opens_with_xml_declaration(text.as_bytes())
            && xml_prolog::root_is_xhtml(text.as_bytes()))
}

/// The visible text of an XHTML page read as XML, by the rules of [`extract_text`]; when it is
/// not well-formed XML, why not (the XML parser's error and its line:column; the caller reads
/// it as HTML, as a lenient reader would, [`self_closing_expanded`] first). HTML's
/// named character references that XML does not define (`&nbsp;`, `&mdash;`: an XHTML DTD
/// defines them, and no DTD is fetched) are read as HTML reads them.
///
/// A document type declaration is dropped unread; one with an internal subset (`[...]`, where
/// entities are declared) sends the page to the HTML reader, which ignores them: expanded, a
/// few kilobytes of entity references can ask for terabytes of text.
pub fn extract_xhtml_text(text: &str) -> Result<String, String> {
    // XML allows nothing before its declaration; whitespace there (a template's stray line
    // break) made the page "not XML" to the parser, and [`is_xhtml`] ignores it too.
    let text = &text[xml_prolog::leading_space(text.as_bytes())..];
    let text = without_doctype(text).ok_or_else(|| {
        "its DOCTYPE declares entities (an internal subset), which dapt does not expand".to_owned()
    })?;
    let text = html_entities_as_numbers(&text);
    let document = roxmltree::Document::parse(&text).map_err(|e| e.to_string())?;
    Ok(visible_text(document.root(), text.len() / 2))
}

/// HTML's void elements: a `/>` on one of these closes nothing in HTML either.
const VOID: &[&str] = &[
    "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr", "img", "input",
    "keygen", "link", "meta", "param", "source", "track", "wbr",
];

/// `text` (XHTML that is not well-formed XML) with each self-closing tag of an element that is
/// not void written as a start and an end tag (`<iframe src="a"/>` as `<iframe
/// src="a"></iframe>`), outside comments and CDATA: read as HTML5, `<iframe/>`, `<textarea/>`
/// or `<title/>` opens an element that swallows the rest of the page (an audit: a bare `&` in
/// one paragraph sent a chapter to the HTML reader, which lost the two paragraphs after an
/// `<iframe/>`).
pub fn self_closing_expanded(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("/>") {
        return std::borrow::Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 64);
    let (mut i, mut copied) = (0, 0);
    while let Some(at) = text[i..].find('<').map(|at| i + at) {
        i = at + 1;
        let rest = &text[at..];
        if let Some(end) = ["<!--", "<![CDATA["]
            .iter()
            .zip(["-->", "]]>"])
            .find(|(open, _)| rest.starts_with(**open))
            .map(|(_, close)| {
                rest.find(close)
                    .map_or(text.len(), |e| at + e + close.len())
            })
        {
            i = end;
            continue;
        }
        let name_len = rest[1..]
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'_' | b'.'))
            .count();
        if name_len == 0 || !bytes[at + 1].is_ascii_alphabetic() {
            continue;
        }
        // The tag's end: the first `>` outside a quoted attribute value (a quote opens one
        // only after `=`: in `x<y don't` the apostrophe is text).
        let mut quote = None;
        let mut after_equals = false;
        let mut j = at + 1 + name_len;
        while j < bytes.len() {
            match (quote, bytes[j]) {
                (None, b'"' | b'\'') if after_equals => quote = Some(bytes[j]),
                (Some(q), c) if c == q => quote = None,
                (None, b'>') => break,
                _ => {}
            }
            if quote.is_none() && !bytes[j].is_ascii_whitespace() {
                after_equals = bytes[j] == b'=';
            }
            j += 1;
        }
        if j >= bytes.len() {
            break;
        }
        let name = &rest[1..1 + name_len];
        let local = name.rsplit(':').next().unwrap_or(name);
        if bytes[j - 1] == b'/' && !VOID.iter().any(|v| v.eq_ignore_ascii_case(local)) {
            out.push_str(&text[copied..j - 1]);
            out.push_str("></");
            out.push_str(name);
            out.push('>');
            copied = j + 1;
        }
        i = j + 1;
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// `text` without its `<!DOCTYPE ...>` (XML's case); `None` when the declaration has an internal
/// subset or does not end.
fn without_doctype(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    let Some(start) = text.find("<!DOCTYPE") else {
        return Some(std::borrow::Cow::Borrowed(text));
    };
    let length = text[start..].find('>')?;
    let declaration = &text[start..start + length];
    if declaration.contains('[') {
        return None;
    }
    Some(std::borrow::Cow::Owned(format!(
        "{}{}",
        &text[..start],
        &text[start + length + 1..]
    )))
}

/// `text` with each `&name;` that HTML defines and XML does not (all but `lt`, `gt`, `amp`,
/// `apos`, `quot`) as numeric references, outside CDATA sections; and each numeric reference to
/// a C1 control (`&#128;` to `&#159;`, `&#x80;` to `&#x9F;`) as the character HTML reads it as,
/// windows-1252's (`&#150;` is `–`): XML's reading, the control itself, put U+0096 in the
/// training text (an audit).
fn html_entities_as_numbers(text: &str) -> std::borrow::Cow<'_, str> {
    use html5ever::data::NAMED_ENTITIES;
    if !text.contains('&') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(['&', '<']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(cdata) = rest.strip_prefix("<![CDATA[") {
            let end = cdata
                .find("]]>")
                .map_or(rest.len(), |e| "<![CDATA[".len() + e + 3);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
            continue;
        }
        // Names are short: look for the `;` in the next 33 bytes only (a page of `&`s
        // without one must not cost a scan to its end each).
        let name = rest.as_bytes()[1..]
            .iter()
            .take(33)
            .position(|&b| b == b';')
            .map(|n| &rest[1..=n + 1])
            .filter(|name| {
                name.len() > 1
                    && name[..name.len() - 1]
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric())
            });
        match name.filter(|n| !matches!(*n, "lt;" | "gt;" | "amp;" | "apos;" | "quot;")) {
            Some(name) if rest.starts_with('&') && NAMED_ENTITIES.get(name).is_some() => {
                let (first, second) = NAMED_ENTITIES.get(name).copied().unwrap_or((0, 0));
                out.push_str(&format!("&#{first};"));
                if second != 0 {
                    out.push_str(&format!("&#{second};"));
                }
                rest = &rest[1 + name.len()..];
            }
            _ => match c1_reference(rest) {
                Some((len, c)) => {
                    out.push_str(&format!("&#{};", u32::from(c)));
                    rest = &rest[len..];
                }
                None => {
                    out.push_str(&rest[..1]);
                    rest = &rest[1..];
                }
            },
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// At the start of `text`, a numeric character reference to a C1 control (U+0080 to U+009F):
/// its length and the character the HTML Standard reads it as (windows-1252's for that byte;
/// the five bytes windows-1252 leaves undefined stay the control, as in HTML).
fn c1_reference(text: &str) -> Option<(usize, char)> {
    let body = text.strip_prefix("&#")?;
    let end = body.bytes().take(8).position(|b| b == b';')?;
    let number = &body[..end];
    let value = match number.strip_prefix(['x', 'X']) {
        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
        None => number.parse().ok()?,
    };
    let byte = u8::try_from(value)
        .ok()
        .filter(|b| (0x80..=0x9f).contains(b))?;
    let bytes = [byte];
    let (decoded, _) = encoding_rs::WINDOWS_1252.decode_without_bom_handling(&bytes);
    Some((2 + end + 1, decoded.chars().next()?))
}

/// A node of a parsed page, as [`visible_text`] walks it: scraper's HTML5 tree or roxmltree's
/// XML one.
trait PageNode<'a>: Copy {
    /// A text node's text (CDATA included).
    fn text(self) -> Option<&'a str>;
    /// An element's local name and whether it is not shown: a class of it marks page chrome,
    /// or it is `hidden` or styled `display: none` ([`hidden`]).
    fn element(self) -> Option<(&'a str, bool)>;
    /// An element's, the document's or a fragment's children.
    fn children(self) -> Vec<Self>;
}

impl<'a> PageNode<'a> for NodeRef<'a, Node> {
    fn text(self) -> Option<&'a str> {
        match self.value() {
            Node::Text(text) => Some(text),
            _ => None,
        }
    }
    fn element(self) -> Option<(&'a str, bool)> {
        match self.value() {
            Node::Element(e) => Some((
                e.name(),
                e.classes().any(|c| SKIPPED_CLASSES.contains(&c))
                    || hidden(e.attr("hidden"), e.attr("style"))
                    || closed_dialog(e.name(), e.attr("open")),
            )),
            _ => None,
        }
    }
    fn children(self) -> Vec<Self> {
        match self.value() {
            Node::Element(_) | Node::Document | Node::Fragment => {
                NodeRef::children(&self).collect()
            }
            _ => Vec::new(),
        }
    }
}

impl<'a, 'input> PageNode<'a> for roxmltree::Node<'a, 'input> {
    fn text(self) -> Option<&'a str> {
        let text = self
            .is_text()
            .then(|| roxmltree::Node::text(&self))
            .flatten()?;
        // HTML's parser drops a newline right after `<pre>` (and `<textarea>`, `<listing>`);
        // XML keeps it: dropped here too, so that a page reads the same either way.
        let first_in_pre = self.prev_sibling().is_none()
            && self
                .parent()
                .is_some_and(|p| matches!(p.tag_name().name(), "pre" | "textarea" | "listing"));
        Some(match first_in_pre {
            true => text.strip_prefix('\n').unwrap_or(text),
            false => text,
        })
    }
    fn element(self) -> Option<(&'a str, bool)> {
        self.is_element().then(|| {
            let chrome = self
                .attribute("class")
                .is_some_and(|c| c.split_whitespace().any(|c| SKIPPED_CLASSES.contains(&c)));
            let name = self.tag_name().name();
            let hidden = hidden(self.attribute("hidden"), self.attribute("style"))
                || closed_dialog(name, self.attribute("open"));
            (name, chrome || hidden)
        })
    }
    fn children(self) -> Vec<Self> {
        roxmltree::Node::children(&self).collect()
    }
}

/// Whether an element with these `hidden` and `style` attributes is not shown: `hidden`
/// (but `hidden="until-found"`, text a reader can find and open), `display: none` or
/// `visibility: hidden` (cookie banners, collapsed mobile menus: stored beside the article
/// before; an audit).
fn hidden(hidden: Option<&str>, style: Option<&str>) -> bool {
    if hidden.is_some_and(|h| !h.trim().eq_ignore_ascii_case("until-found")) {
        return true;
    }
    style.is_some_and(|style| {
        let style: String = style
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .flat_map(char::to_lowercase)
            .collect();
        style.split(';').any(|d| {
            let d = d.trim_end_matches("!important");
            d == "display:none" || d == "visibility:hidden"
        })
    })
}

/// Whether an element is a `<dialog>` without `open`: not shown until a script opens it (cookie,
/// newsletter and login modals; an audit found them stored beside the article).
fn closed_dialog(name: &str, open: Option<&str>) -> bool {
    name == "dialog" && open.is_none()
}

/// HTML's whitespace (the only characters its layout collapses): a no-break space, a thin
/// space or an ideographic space is text.
fn html_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0C')
}

/// The text of a page as [`visible_text`] builds it: whitespace outside preformatted text
/// collapsed as a browser lays it out (a space between two inline elements is one space, at
/// most one between words, none at a line's start or end), blocks on lines of their own, `<br>`
/// a line break, preformatted text exactly as written.
#[derive(Default)]
struct Layout {
    out: String,
    /// Collapsible whitespace seen since the last text: one space, if text follows on the line.
    space: bool,
    /// Where preformatted text last ended in `out`: trailing spaces before it are its own.
    kept: usize,
}

impl Layout {
    fn at_line_start(&self) -> bool {
        self.out.is_empty() || self.out.ends_with('\n') || self.out.ends_with('\t')
    }

    /// Running text: its whitespace runs collapse into the pending space.
    fn text(&mut self, text: &str) {
        for (i, word) in text.split(html_space).enumerate() {
            if i > 0 {
                self.space = true;
            }
            if !word.is_empty() {
                self.word(word);
            }
        }
    }

    fn word(&mut self, word: &str) {
        if std::mem::take(&mut self.space) && !self.at_line_start() {
            self.out.push(' ');
        }
        self.out.push_str(word);
    }

    /// Preformatted text, as written.
    fn preformatted(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if std::mem::take(&mut self.space) && !self.at_line_start() {
            self.out.push(' ');
        }
        self.out.push_str(text);
        self.kept = self.out.len();
    }

    /// Ends the line unless it is empty (a block's edge).
    fn block_edge(&mut self) {
        self.trim_line_end();
        if !self.at_line_start() || self.out.ends_with('\t') {
            self.out.push('\n');
        }
        self.space = false;
    }

    /// `<br>`: a line break, even on an empty line (two make a blank line), at most one blank
    /// line in a row outside preformatted text.
    fn line_break(&mut self, in_pre: bool) {
        self.trim_line_end();
        if in_pre || !self.out.ends_with("\n\n") {
            self.out.push('\n');
        }
        self.space = false;
        if in_pre {
            self.kept = self.out.len();
        }
    }

    /// A table cell's start: a tab from the cell before, so that their words never run
    /// together.
    fn cell(&mut self) {
        self.trim_line_end();
        if !self.at_line_start() {
            self.out.push('\t');
        }
        self.space = false;
    }

    /// Drops the spaces at the end of the line (never preformatted text's own): collapsed
    /// ones, and no-break and other spaces a browser shows as nothing there (`<p>&nbsp;</p>`, a
    /// spacer paragraph of word processors, is no line).
    fn trim_line_end(&mut self) {
        let trimmed = self
            .out
            .trim_end_matches(|c: char| c.is_whitespace() && c != '\n')
            .len()
            .max(self.kept);
        self.out.truncate(trimmed.min(self.out.len()));
    }

    fn finish(mut self) -> String {
        self.kept = 0;
        self.trim_line_end();
        let text = self.out.trim_end_matches(char::is_whitespace);
        text.trim_start_matches('\n').to_owned()
    }
}

/// The visible text under `root`: chrome and hidden elements skipped, blocks on lines of their
/// own, preformatted text as laid out, whitespace elsewhere collapsed as a browser shows it.
fn visible_text<'a, N: PageNode<'a>>(root: N, capacity: usize) -> String {
    let mut layout = Layout {
        out: String::with_capacity(capacity),
        ..Layout::default()
    };
    // Explicit stack instead of recursion: a hostile page can nest elements arbitrarily deep.
    enum Visit<N> {
        Enter(N),
        Leave { block: bool, pre: bool },
    }
    let mut stack = vec![Visit::Enter(root)];
    let mut pre_depth = 0usize;
    while let Some(visit) = stack.pop() {
        match visit {
            Visit::Enter(node) => {
                if let Some(text) = node.text() {
                    if pre_depth > 0 {
                        layout.preformatted(text);
                    } else {
                        layout.text(text);
                    }
                    continue;
                }
                let (block, pre) = match node.element() {
                    Some((name, not_shown)) => {
                        // A page hidden whole until its script runs (`<body
                        // style="display:none">`) is still its text.
                        let whole_page = matches!(name, "html" | "body");
                        if (not_shown && !whole_page) || SKIPPED.contains(&name) {
                            continue;
                        }
                        if name == "br" {
                            layout.line_break(pre_depth > 0);
                            continue;
                        }
                        let block = BLOCKS.contains(&name);
                        if block {
                            layout.block_edge();
                        } else if CELLS.contains(&name) {
                            layout.cell();
                        }
                        (block, PREFORMATTED.contains(&name))
                    }
                    None => (false, false),
                };
                if pre {
                    pre_depth += 1;
                }
                stack.push(Visit::Leave { block, pre });
                // Children go on the stack in reverse so they are visited in order.
                stack.extend(node.children().into_iter().rev().map(Visit::Enter));
            }
            Visit::Leave { block, pre } => {
                if pre {
                    pre_depth -= 1;
                }
                if block {
                    layout.block_edge();
                }
            }
        }
    }
    layout.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth is the tree's, as a browser builds it: elements the tree builder closes by
    /// itself do not nest (an audit: a legacy page of 4,100 unclosed `<a name>` anchors, or of
    /// 5,000 paragraphs each opening a `<font>`, was refused as nested 4,100 deep).
    #[test]
    fn nesting_is_the_depth_of_the_tree_the_parser_builds() {
        let depth = |html: &str| match parse_within_depth(html, MAX_NESTING) {
            Ok(document) => tree_depth(&document),
            Err(TooDeep(depth)) => depth,
        };
        // html > body > div > section > b > text
        assert_eq!(depth("<div><section><b>x</b></section></div>"), 6);
        // optional end tags, void elements, end tags of what is not open
        let sloppy = "<ul>".to_owned() + &"<li><p>item<br><img src=x></span>".repeat(10_000);
        assert_eq!(depth(&sloppy), 6);
        // an end tag closes what was left open inside it
        // (and the formatting elements it closes are reopened in the next one, three deep at
        // most: html > body > div > b > i > b > i > b > i > b > i > text)
        assert_eq!(depth(&"<div><b><i>text</div>".repeat(10_000)), 12);
        // an `<a>` closes the open `<a>`
        let anchors: String = (0..4_100)
            .map(|i| format!("<a name=s{i}>Section {i}<br>text<br>"))
            .collect();
        assert_eq!(depth(&anchors), 4);
        // a `<p>` closes the open `<p>` and the `<font>` in it; like formatting elements are
        // reopened three at most (html > body > p > font x 4 > text)
        let fonts: String = (0..5_000)
            .map(|i| format!("<p><font face=Arial size=2>Paragraph {i} of an old page."))
            .collect();
        assert_eq!(depth(&fonts), 8);
        // markup inside a script or a style is text
        let script = format!(
            "<script>{}</script><style>{}</style>",
            "<div>".repeat(9_000),
            "<div>".repeat(9_000)
        );
        assert_eq!(depth(&script), 4);
        // `/>` does not close an HTML element (it does in SVG)
        assert!(depth(&"<div/>".repeat(10_000)) > MAX_NESTING);
        assert_eq!(
            depth(&format!("<svg>{}</svg>", "<path/>".repeat(10_000))),
            4
        );
        // a hostile page stops being parsed past the limit, at once
        for tag in ["<div>", "<span>", "<b>", "<div><span>"] {
            let started = std::time::Instant::now();
            let deep = format!("<p>text{}", tag.repeat(100_000));
            assert!(depth(&deep) > MAX_NESTING, "{tag}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{tag}: {:?}",
                started.elapsed()
            );
        }
        // nesting that goes past the limit and back within one piece of input
        let spike = "<div>".repeat(5_000) + &"</div>".repeat(5_000) + "<p>after";
        assert!(depth(&spike) > MAX_NESTING);
    }

    /// The page is parsed in pieces: a piece's end inside a tag, a character reference, a
    /// `\r\n` or a script's end changes nothing.
    #[test]
    fn a_page_parsed_in_pieces_reads_as_one_parsed_whole() {
        let tail = "<p>a&amp;b&eacute;\r\nc\u{e9}d<scr\
                    ipt>x</script><pre>\r\n keep</pre><b>bold</b> \u{1F600}&#x41;</p>";
        for pad in PARSE_PIECE - 60..PARSE_PIECE + 4 {
            let page = format!("<html><body><p>{}</p>{tail}</body></html>", "x".repeat(pad));
            assert_eq!(
                page_text(&page, MAX_NESTING),
                Ok(extract_text(&page)),
                "{pad}"
            );
        }
    }

    use super::extract_text;

    #[test]
    fn skips_chrome_and_keeps_structure() {
        let html = r#"<html><head><title>T</title><style>p{}</style></head><body>
            <div class="navheader"><a href="x">Prev</a> Up</div>
            <h1>Indexes</h1><p>An index   is a
            <b>data</b> structure.</p><script>alert(1)</script>
            <pre class="programlisting">CREATE INDEX i
    ON t (c);</pre><div class="navfooter">Next</div></body></html>"#;
        let text = extract_text(html);
        assert_eq!(
            text,
            "Indexes\nAn index is a data structure.\nCREATE INDEX i\n    ON t (c);"
        );
    }

    /// What a browser shows, from an audit's pages: a space between two inline elements is a
    /// space ("Helloworld", "datatypeBETWEENdatatype" in the quickstart's manual before);
    /// block elements of browsers' style sheet on their own lines; `noframes`, `noembed` and
    /// hidden elements not shown; preformatted text as written (blank lines, trailing spaces,
    /// `<br><br>`); no-break, thin and ideographic spaces are text, not layout. The same
    /// through the XHTML reader.
    #[test]
    fn text_is_laid_out_as_a_browser_shows_it() {
        let cases = [
            ("<p><b>Hello</b> <i>world</i></p>", "Hello world"),
            (
                "<p><code>datatype</code> <code>BETWEEN</code>\n  <code>x</code></p>",
                "datatype BETWEEN x",
            ),
            ("<p>a <b> b </b> c</p>", "a b c"),
            (
                "<details><summary>Show the answer</summary>The index is used.</details>\
                 <address>Jane Doe</address><fieldset><legend>Options</legend>x</fieldset>\
                 <center>c</center><select><option>16.2</option><option>15.6</option></select>",
                "Show the answer\nThe index is used.\nJane Doe\nOptions\nx\nc\n16.2\n15.6",
            ),
            (
                "<noframes><h2>Frame Alert</h2></noframes><noembed>e</noembed><p>kept</p>",
                "kept",
            ),
            (
                "<p>article</p><div hidden>cookie banner</div><div style=\"Display : None\">menu\
                 </div><span style=\"color:red;visibility:hidden\">x</span>\
                 <div hidden=\"until-found\">found</div>",
                "article\nfound",
            ),
            (
                "<pre>def f():  \n\tpass\n\n\ndef g():\n    pass</pre><p>after</p>",
                "def f():  \n\tpass\n\n\ndef g():\n    pass\nafter",
            ),
            ("<pre>a<br><br>b</pre>", "a\n\nb"),
            // Hidden by browsers' default style sheet (an audit): a dialog not opened, MathML's
            // TeX annotation, ruby's fallback parentheses, a `<title>` in the body.
            (
                "<p>Article text.</p><dialog id=\"consent\"><p>We use cookies.</p>\
                 <button>Accept all</button></dialog><dialog open=\"\">Shown</dialog>\
                 <p>More article.</p>",
                "Article text.\nShown\nMore article.",
            ),
            (
                "<p>Let <math><semantics><mrow><msup><mi>x</mi><mn>2</mn></msup><mo>+</mo>\
                 <mn>1</mn></mrow><annotation encoding=\"application/x-tex\">x^{2}+1\
                 </annotation><annotation-xml encoding=\"MathML-Content\"><ci>x</ci>\
                 </annotation-xml></semantics></math> be positive.</p>",
                "Let x2+1 be positive.",
            ),
            (
                "<p>one</p><title>stray title</title><p>two <ruby>漢<rp>(</rp><rt>kan</rt>\
                 <rp>)</rp></ruby></p>",
                "one\ntwo 漢kan",
            ),
            (
                "<p>one<br><br>two<br><br><br><br>three</p>",
                "one\n\ntwo\n\nthree",
            ),
            // Spacer paragraphs and trailing no-break spaces are nothing a browser shows.
            (
                "<p>Intro</p><p>&nbsp;</p><p>Body&nbsp;</p><div>&#160;</div><p>a&nbsp;b</p>",
                "Intro\nBody\na\u{a0}b",
            ),
            (
                "<p>10&thinsp;000&nbsp;&euro; &nbsp; x</p><p>\u{3000}\u{672c}\u{6587}</p>",
                "10\u{2009}000\u{a0}\u{20ac} \u{a0} x\n\u{3000}\u{672c}\u{6587}",
            ),
        ];
        for (body, shown) in cases {
            let html = format!("<html><body>{body}</body></html>");
            assert_eq!(extract_text(&html), shown, "{body}");
            let xhtml = format!(
                "<?xml version=\"1.0\"?><html xmlns=\"http://www.w3.org/1999/xhtml\"><body>{}\
                 </body></html>",
                body.replace("<br>", "<br/>")
                    .replace(" hidden>", " hidden=\"\">")
            );
            assert_eq!(
                extract_xhtml_text(&xhtml).ok().as_deref(),
                Some(shown),
                "xhtml: {body}"
            );
        }
    }

    /// A page hidden whole until its script runs (`<body style="display:none">`, `<html
    /// style="visibility:hidden">`) is still its text (it became empty).
    #[test]
    fn a_page_hidden_whole_is_still_its_text() {
        for page in [
            "<html><body style=\"display:none\"><p>text</p><div hidden>no</div></body></html>",
            "<html style=\"visibility:hidden\"><body><p>text</p></body></html>",
        ] {
            assert_eq!(extract_text(page), "text", "{page}");
        }
    }

    /// XHTML that is not well-formed (a bare `&`, an undeclared `epub:` prefix) goes to the HTML
    /// reader with its self-closing tags expanded: read as HTML5, `<iframe/>` and
    /// `<textarea/>` swallowed the rest of the chapter (an audit).
    #[test]
    fn xhtml_that_is_not_xml_loses_nothing_to_self_closing_tags() {
        let page = "<?xml version=\"1.0\"?><html xmlns=\"http://www.w3.org/1999/xhtml\"><head>\
            <title/></head><body><section epub:type=\"chapter\"><p>Chapter one: AT&T history.\
            </p><iframe src=\"a.html\"/><p>Second <br/>paragraph.</p><textarea/><!-- <b/> -->\
            <p title=\"a/>b\">Third.</p></section></body></html>";
        let err = extract_xhtml_text(page).expect_err("not well-formed");
        assert!(err.contains(':'), "{err}");
        let expanded = self_closing_expanded(page);
        assert!(
            expanded.contains("<iframe src=\"a.html\"></iframe>")
                && expanded.contains("<br/>")
                && expanded.contains("<textarea></textarea>")
                && expanded.contains("<!-- <b/> -->")
                && expanded.contains("<p title=\"a/>b\">"),
            "{expanded}"
        );
        assert_eq!(
            extract_text(&expanded),
            "Chapter one: AT&T history.\nSecond\nparagraph.\nThird."
        );
        // A quote outside an attribute value is text: the tags after it are still expanded.
        let text = "<p>x<y don't</p><iframe/><p>after</p>";
        assert_eq!(
            self_closing_expanded(text),
            "<p>x<y don't</p><iframe></iframe><p>after</p>"
        );
    }

    #[test]
    fn table_cells_stay_apart() {
        let html = "<table><tr><td>reserved</td><td>non-reserved</td></tr><tr><th>a</th><th>b</th></tr></table>";
        assert_eq!(extract_text(html), "reserved\tnon-reserved\na\tb");
    }

    /// XHTML read as XML: self-closing raw-text elements close, CDATA is text, HTML's named
    /// references read as HTML reads them (CDATA keeps its `&name;` as written), chrome and
    /// blocks as in HTML. Read as HTML5, the first chapter below lost every word after
    /// `<title/>`, the second everything after `<iframe/>` (an audit).
    #[test]
    fn xhtml_is_read_as_xml() {
        let page = |body: &str| {
            format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<!DOCTYPE html PUBLIC \
                 \"-//W3C//DTD XHTML 1.1//EN\" \"http://www.w3.org/TR/xhtml11/DTD/xhtml11.dtd\">\n\
                 <html xmlns=\"http://www.w3.org/1999/xhtml\"><head><title/><script \
                 src=\"x.js\"/></head><body>{body}</body></html>"
            )
        };
        let one =
            page("<h1>Chapter One</h1><p>It was a bright&nbsp;cold day &mdash; in April.</p>");
        assert!(is_xhtml(std::path::Path::new("ch1.html"), &one));
        assert_eq!(
            extract_xhtml_text(&one).ok().as_deref(),
            Some("Chapter One\nIt was a bright\u{a0}cold day \u{2014} in April.")
        );
        let two = page(
            "<p>Before the embed.</p><iframe src=\"a.html\"/><textarea/><p>After: \
             <![CDATA[a < b && b > c &nbsp;]]> in code.</p><div class=\"navfooter\">Next</div>",
        );
        assert_eq!(
            extract_xhtml_text(&two).ok().as_deref(),
            Some("Before the embed.\nAfter: a < b && b > c &nbsp; in code.")
        );
        // Not well-formed: the caller reads it as HTML.
        assert!(extract_xhtml_text("<p>unclosed <b>bold</p>").is_err());
        // Entities declared in the page are never expanded: the page goes to the HTML reader.
        let bomb = format!(
            "<?xml version=\"1.0\"?><!DOCTYPE html [<!ENTITY b \"{}\">]><html \
             xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>{}</p></body></html>",
            "x".repeat(1000),
            "&b;".repeat(1000)
        );
        assert!(extract_xhtml_text(&bomb).is_err());
        assert!(is_xhtml(std::path::Path::new("c.XHTML"), "<p>x</p>"));
        assert!(!is_xhtml(
            std::path::Path::new("c.html"),
            "<html><p>x</p></html>"
        ));
        // `&` without a name, unknown names and XML's own five pass through to the parser.
        assert_eq!(
            html_entities_as_numbers("a & b &unknown; &lt; &copy;&nbsp"),
            "a & b &unknown; &lt; &#169;&nbsp"
        );
        // C1 controls by number are windows-1252's characters, as HTML reads them.
        assert_eq!(
            html_entities_as_numbers("&#150;&#x80;&#X9f;&#129;&#160;&#x7f;"),
            "&#8211;&#8364;&#376;&#129;&#160;&#x7f;"
        );
    }

    /// An EPUB chapter whose licence comment pushed the XHTML namespace past the first 4 KiB
    /// was read as HTML5: its `<script/>` and `<title/>` swallowed the rest of the page, without
    /// a word (an audit). The root element decides, however far down it is; the namespace named
    /// only in a comment does not.
    #[test]
    fn xhtml_after_a_long_prolog_is_xhtml() {
        let page = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<!-- {} -->\n<html \
             xmlns=\"http://www.w3.org/1999/xhtml\"><head><title>t</title></head><body>\
             <p>one</p><script/><p>two</p><title/><p>three</p></body></html>",
            "licence text ".repeat(400)
        );
        let path = std::path::Path::new("ch1.html");
        assert!(is_xhtml(path, &page));
        assert_eq!(
            extract_xhtml_text(&page).ok().as_deref(),
            Some("one\ntwo\nthree")
        );
        assert!(!is_xhtml(
            path,
            "<?xml version=\"1.0\"?><!-- http://www.w3.org/1999/xhtml --><html><p>x</p></html>"
        ));
    }

    /// A page that opens with a line break before its XML declaration was taken for XHTML but
    /// was "not XML" to the parser (`unexpected XML declaration at 2:1`) and read as HTML with
    /// a warning (an audit): the whitespace is ignored here too.
    #[test]
    fn whitespace_before_the_xml_declaration_is_ignored() {
        let page = "\r\n\n<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<html \
                    xmlns=\"http://www.w3.org/1999/xhtml\"><head><title>t</title></head><body>\
                    <p>one</p><title/><p>two</p></body></html>";
        assert!(is_xhtml(std::path::Path::new("a.xhtml"), page));
        assert!(is_xhtml(std::path::Path::new("a.html"), page));
        assert_eq!(extract_xhtml_text(page).ok().as_deref(), Some("one\ntwo"));
    }

    /// Well-formed XHTML without the constructs HTML5 reads otherwise reads the same through
    /// either reader: the quickstart's 78 PostgreSQL manual pages (XHTML 1.0), byte for byte
    /// (HTML's dropped newline after `<pre>` included).
    #[test]
    fn the_xml_reader_reads_ordinary_xhtml_as_the_html_reader_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/quickstart/corpus/postgres");
        let mut pages = 0;
        for entry in std::fs::read_dir(&dir).expect("the quickstart corpus") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "html") {
                continue;
            }
            let page = std::fs::read_to_string(&path).expect("utf-8 page");
            assert!(is_xhtml(&path, &page), "{}", path.display());
            assert_eq!(
                extract_xhtml_text(&page).ok().as_deref(),
                Some(extract_text(&page).as_str()),
                "{}",
                path.display()
            );
            pages += 1;
        }
        assert_eq!(pages, 78);
    }

    #[test]
    fn survives_deep_nesting_and_garbage() {
        let deep = "<div>".repeat(20_000) + "x";
        assert_eq!(extract_text(&deep), "x");
        assert_eq!(extract_text("<<<>>> &amp; <p"), "<<<>>> &");
    }
}
