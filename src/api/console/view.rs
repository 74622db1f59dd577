//! Pure helpers the console's pages draw with: charts as inline SVG (no script, no library),
//! the difference between two JSON states (handoffs), and Python source with its tokens
//! marked for highlighting. No I/O; maud escapes every value.

use maud::{Markup, html};
use serde_json::Value;

// ---- charts ------------------------------------------------------------------------------

/// Width and height of a chart's drawing, in its own units (the SVG scales to its box).
const W: f64 = 600.0;
const H: f64 = 110.0;

/// The largest value to draw up to: `max` rounded up to a 1-2-5 step, never 0.
pub fn scale_max(max: f64) -> f64 {
    if max.is_nan() || max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= max * 0.999_999)
        .unwrap_or(10.0 * magnitude)
}

/// A short number: 950, 1.2k, 3.4M.
pub fn short(v: f64) -> String {
    // An empty sum is -0.0; it reads as 0.
    let v = v + 0.0;
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// One bar of a chart: its slot (0 = oldest), value, and the tooltip.
pub struct Bar {
    pub slot: usize,
    pub value: f64,
    pub label: String,
}

/// A bar chart of `slots` slots (a slot without a bar is empty), with the scale's top value
/// and `unit` written at the top left. `id` names the chart for the page and its tests.
pub fn bars(id: &str, title: &str, unit: &str, slots: usize, data: &[Bar], class: &str) -> Markup {
    let slots = slots.max(1);
    let top = scale_max(data.iter().map(|b| b.value).fold(0.0, f64::max));
    let step = W / slots as f64;
    let total: f64 = data.iter().map(|b| b.value).sum();
    html! {
        figure.chart id=(id) {
            figcaption { (title) }
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(format!("{title}: {} {unit} in all", short(total))) preserveAspectRatio="none" {
                line.axis x1="0" y1=(H) x2=(W) y2=(H) {}
                line.grid x1="0" y1="0.5" x2=(W) y2="0.5" {}
                @for b in data {
                    @let h = (b.value / top * (H - 2.0)).max(if b.value > 0.0 { 1.0 } else { 0.0 });
                    rect class=(class) x=(format!("{:.1}", b.slot as f64 * step + step * 0.1)) y=(format!("{:.1}", H - h))
                        width=(format!("{:.1}", step * 0.8)) height=(format!("{h:.1}")) {
                        title { (b.label) }
                    }
                }
            }
            div.scale { span { (short(top)) " " (unit) } span.muted { "last hour" } }
        }
    }
}

/// One line of a chart: its name, CSS class and points (x in 0..=1, value in 0..=100).
pub type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Lines of values in 0..=100 over time (CPU, memory).
pub fn percent_lines(id: &str, title: &str, series: &[Series<'_>]) -> Markup {
    html! {
        figure.chart id=(id) {
            figcaption { (title) }
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) preserveAspectRatio="none" {
                line.axis x1="0" y1=(H) x2=(W) y2=(H) {}
                line.grid x1="0" y1=(H / 2.0) x2=(W) y2=(H / 2.0) {}
                @for (_, class, points) in series {
                    polyline class=(class) fill="none" points=(polyline(points)) {}
                }
            }
            div.scale {
                span { "100 %" }
                @for (name, class, points) in series {
                    span class=(format!("key {class}")) { (name) " " (points.last().map_or("-".to_string(), |p| format!("{:.0} %", p.1))) }
                }
            }
        }
    }
}

fn polyline(points: &[(f64, f64)]) -> String {
    points
        .iter()
        .map(|(x, v)| {
            format!(
                "{:.1},{:.1}",
                x.clamp(0.0, 1.0) * W,
                H - v.clamp(0.0, 100.0) / 100.0 * (H - 2.0)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- JSON differences ----------------------------------------------------------------------

/// One difference between two JSON values, at a JSON pointer.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added(String, Value),
    Removed(String, Value),
    Changed(String, Value, Value),
}

/// What changed from `old` to `new`: objects key by key (recursively), everything else
/// (arrays included) as a whole. Keys in order; at most `limit` changes, and how many more.
pub fn diff(old: &Value, new: &Value, limit: usize) -> (Vec<Change>, usize) {
    let mut out = Vec::new();
    let mut more = 0;
    walk("", old, new, limit, &mut out, &mut more);
    (out, more)
}

fn push(out: &mut Vec<Change>, more: &mut usize, limit: usize, c: Change) {
    if out.len() < limit {
        out.push(c);
    } else {
        *more += 1;
    }
}

fn walk(at: &str, old: &Value, new: &Value, limit: usize, out: &mut Vec<Change>, more: &mut usize) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => walk(&path, x, y, limit, out, more),
                    (None, Some(y)) => push(out, more, limit, Change::Added(path, y.clone())),
                    (Some(x), None) => push(out, more, limit, Change::Removed(path, x.clone())),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => {
            let path = if at.is_empty() { "/" } else { at };
            push(
                out,
                more,
                limit,
                Change::Changed(path.to_string(), a.clone(), b.clone()),
            );
        }
        _ => {}
    }
}

/// A value as one short line.
fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(119).collect::<String>())
    } else {
        s
    }
}

/// The differences as a list (`+` added, `−` removed, `~` changed).
pub fn diff_list(changes: &[Change], more: usize) -> Markup {
    html! {
        @if changes.is_empty() {
            p.muted { "No change from the run before." }
        } @else {
            ul.diff {
                @for c in changes {
                    @match c {
                        Change::Added(p, v) => li.added { code { "+ " (p) } " " (compact(v)) },
                        Change::Removed(p, v) => li.removed { code { "− " (p) } " " (compact(v)) },
                        Change::Changed(p, a, b) => li.changed { code { "~ " (p) } " " (compact(a)) " → " (compact(b)) },
                    }
                }
                @if more > 0 { li.muted { "and " (more) " more" } }
            }
        }
    }
}

// ---- Python highlighting -------------------------------------------------------------------

const KEYWORDS: &[&str] = &[
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue",
    "def", "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import",
    "in", "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while",
    "with", "yield",
];

/// A token of Python source as the highlighter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Plain,
    Keyword,
    Str,
    Comment,
    Number,
    /// The name after `def` or `class`.
    Name,
}

/// Splits Python source into highlighted runs; concatenated they are the source exactly.
pub fn python_tokens<'a>(src: &'a str) -> Vec<(Token, &'a str)> {
    let b = src.as_bytes();
    let mut out: Vec<(Token, &'a str)> = Vec::new();
    let mut i = 0;
    let mut plain = 0;
    let mut name_next = false;
    let flush = |out: &mut Vec<(Token, &'a str)>, from: usize, to: usize| {
        if to > from {
            out.push((Token::Plain, &src[from..to]));
        }
    };
    while i < b.len() {
        let c = b[i];
        if c == b'#' {
            flush(&mut out, plain, i);
            let end = src[i..].find('\n').map_or(b.len(), |n| i + n);
            out.push((Token::Comment, &src[i..end]));
            i = end;
            plain = i;
        } else if c == b'"' || c == b'\'' {
            // A string prefix (r, b, f, rb, …) is the identifier just before it.
            let mut start = i;
            while start > plain && start > i.saturating_sub(2) && b[start - 1].is_ascii_alphabetic()
            {
                start -= 1;
            }
            if start < i && !src[start..i].chars().all(|ch| "rRbBfFuU".contains(ch)) {
                start = i;
            }
            flush(&mut out, plain, start);
            let triple = b.len() >= i + 3 && b[i + 1] == c && b[i + 2] == c;
            let mut j = if triple { i + 3 } else { i + 1 };
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'\\' {
                    j += 2;
                    continue;
                }
                if triple {
                    if b[j] == c && b.len() >= j + 3 && b[j + 1] == c && b[j + 2] == c {
                        j += 3;
                        break;
                    }
                } else if b[j] == c {
                    j += 1;
                    break;
                } else if b[j] == b'\n' {
                    break;
                }
                j += 1;
            }
            let j = j.min(b.len());
            out.push((Token::Str, &src[start..j]));
            i = j;
            plain = i;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j < b.len() && (b[j] == b'"' || b[j] == b'\'') {
                // A string prefix: the string branch takes it.
                i = j;
                continue;
            }
            let word = &src[i..j];
            if name_next {
                flush(&mut out, plain, i);
                out.push((Token::Name, word));
                plain = j;
                name_next = false;
            } else if KEYWORDS.contains(&word) {
                flush(&mut out, plain, i);
                out.push((Token::Keyword, word));
                plain = j;
                name_next = word == "def" || word == "class";
            }
            i = j;
        } else if c.is_ascii_digit()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'.' || b[j] == b'_') {
                j += 1;
            }
            flush(&mut out, plain, i);
            out.push((Token::Number, &src[i..j]));
            i = j;
            plain = i;
        } else {
            if !c.is_ascii_whitespace() {
                name_next = false;
            }
            // Step over a whole UTF-8 character.
            i += src[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    flush(&mut out, plain, b.len());
    out
}

/// Python source with its tokens in classed spans.
pub fn python(src: &str) -> Markup {
    html! {
        @for (t, text) in python_tokens(src) {
            @match t {
                Token::Plain => (text),
                Token::Keyword => span.k { (text) },
                Token::Str => span.s { (text) },
                Token::Comment => span.c { (text) },
                Token::Number => span.n { (text) },
                Token::Name => span.f { (text) },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_chart_scale_rounds_up_to_one_two_or_five() {
        assert_eq!(scale_max(0.0), 1.0);
        assert_eq!(scale_max(0.7), 1.0);
        assert_eq!(scale_max(1.0), 1.0);
        assert_eq!(scale_max(1.2), 2.0);
        assert_eq!(scale_max(37.0), 50.0);
        assert_eq!(scale_max(501.0), 1000.0);
        assert_eq!(scale_max(f64::NAN), 1.0);
        assert_eq!(short(950.0), "950");
        assert_eq!(short(1234.0), "1.2k");
        assert_eq!(short(45_000.0), "45k");
        assert_eq!(short(3_400_000.0), "3.4M");
        assert_eq!(short(0.25), "0.2");
        assert_eq!(short(std::iter::empty::<f64>().sum()), "0");
    }

    #[test]
    fn a_bar_chart_has_one_bar_per_value_scaled_to_the_top() {
        let data = vec![
            Bar {
                slot: 0,
                value: 10.0,
                label: "a".into(),
            },
            Bar {
                slot: 59,
                value: 20.0,
                label: "b <x>".into(),
            },
        ];
        let svg = bars("c", "Done", "/min", 60, &data, "ok").into_string();
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(svg.contains("b &lt;x&gt;"), "labels are escaped: {svg}");
        assert!(svg.contains("20 /min"), "{svg}");
        assert!(svg.contains("30 /min in all"), "{svg}");
        let empty = bars("e", "Done", "/min", 60, &[], "ok").into_string();
        assert!(empty.contains("Done: 0 /min in all"), "{empty}");
        // The tallest bar reaches the top.
        assert!(svg.contains("height=\"108.0\""), "{svg}");
    }

    #[test]
    fn the_difference_of_two_states_names_each_changed_key() {
        let old = json!({"cursor": 4, "seen": ["a"], "deep": {"x": 1, "y": 2}, "gone": true});
        let new =
            json!({"cursor": 5, "seen": ["a", "b"], "deep": {"x": 1, "z": 3}, "new/key": null});
        let (changes, more) = diff(&old, &new, 10);
        assert_eq!(more, 0);
        assert_eq!(
            changes,
            vec![
                Change::Changed("/cursor".into(), json!(4), json!(5)),
                Change::Removed("/deep/y".into(), json!(2)),
                Change::Added("/deep/z".into(), json!(3)),
                Change::Removed("/gone".into(), json!(true)),
                Change::Added("/new~1key".into(), json!(null)),
                Change::Changed("/seen".into(), json!(["a"]), json!(["a", "b"])),
            ]
        );
        assert_eq!(diff(&old, &old, 10), (vec![], 0));
        let (few, more) = diff(&old, &new, 2);
        assert_eq!((few.len(), more), (2, 4));
        assert_eq!(
            diff(&json!(1), &json!("one"), 5).0,
            vec![Change::Changed("/".into(), json!(1), json!("one"))]
        );
    }

    #[test]
    fn python_tokens_cover_the_source_exactly_and_mark_what_they_are() {
        let src = "import json  # a # comment\nclass Agent:\n    async def execute(self):\n        s = r'#not a comment' + \"\"\"two\nlines\"\"\"\n        return {\"n\": 42, 'x1': 3.5} é\n";
        let tokens = python_tokens(src);
        assert_eq!(tokens.iter().map(|(_, t)| *t).collect::<String>(), src);
        let of = |kind: Token| -> Vec<&str> {
            tokens
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, t)| *t)
                .collect()
        };
        assert_eq!(
            of(Token::Keyword),
            ["import", "class", "async", "def", "return"]
        );
        assert_eq!(of(Token::Name), ["Agent", "execute"]);
        assert_eq!(of(Token::Comment), ["# a # comment"]);
        assert_eq!(
            of(Token::Str),
            [
                "r'#not a comment'",
                "\"\"\"two\nlines\"\"\"",
                "\"n\"",
                "'x1'"
            ]
        );
        assert_eq!(of(Token::Number), ["42", "3.5"]);
        let html = python("x = '<b>'").into_string();
        assert!(html.contains("&lt;b&gt;"), "{html}");
        // An unterminated string ends with its line, and the rest is still covered.
        let odd = "s = 'open\nx = 1";
        assert_eq!(
            python_tokens(odd)
                .iter()
                .map(|(_, t)| *t)
                .collect::<String>(),
            odd
        );
        assert_eq!(
            python_tokens("x1 = 2")
                .iter()
                .filter(|(k, _)| *k == Token::Number)
                .count(),
            1
        );
    }
}
