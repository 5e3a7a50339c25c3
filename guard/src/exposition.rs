//! The Prometheus text exposition format (version 0.0.4): what dcgm-exporter, Kepler and
//! cAdvisor serve and the agent's `prometheus_scrape` source reads. Comments and `# TYPE`
//! lines are skipped; labels may hold escapes; a timestamp after the value is ignored (the
//! agent stamps readings with its own tick).

use std::collections::BTreeMap;

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format (comments, labels with escapes, optional
/// timestamps). An unparseable line is an error naming its number.
pub fn parse_text(text: &str) -> Result<Vec<Line>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|why| format!("line {}: {why}: {raw}", n + 1))?);
    }
    Ok(out)
}

/// A metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or, without colons, a label name.
fn valid_name(name: &str, colons: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic()
            || c == '_'
            || (colons && c == ':')
            || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

fn parse_line(line: &str) -> Result<Line, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_string();
    if !valid_name(&name, true) {
        return Err(format!("`{name}` is not a metric name"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end;
        loop {
            // Skip separators, find the label name or the closing brace.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some(&(start, c)) = chars.peek() else {
                return Err("unclosed `{`".into());
            };
            if c == '}' {
                end = start + 1;
                break;
            }
            let eq = inner[start..].find('=').ok_or("a label without `=`")? + start;
            let key = inner[start..eq].trim().to_string();
            if !valid_name(&key, false) {
                return Err(format!("`{key}` is not a label name"));
            }
            while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("unfinished escape".into()),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("label {key} has an unclosed value")),
                }
            }
            labels.insert(key, value);
        }
        rest = &inner[end..];
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("`{v}` is not a number"))?,
    };
    Ok(Line {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_is_parsed_with_escapes_and_timestamps() {
        let lines = parse_text(
            "# HELP x y\n# TYPE x gauge\nx 1\ny{a=\"1\",b=\"q\\\"uo\\\\te\\n\"} 2.5 1700000000000\nz{a=\"x\",} NaN\n",
        )
        .expect("parses");
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].value, 1.0);
        assert_eq!(lines[1].labels["b"], "q\"uo\\te\n");
        assert_eq!(lines[1].value, 2.5);
        assert!(lines[2].value.is_nan());
        let e = parse_text("ok 1\nbad{a=\"1\" 2\n").expect_err("unclosed");
        assert!(e.starts_with("line 2: "), "{e}");
        assert!(
            parse_text("x abc")
                .expect_err("nan")
                .contains("`abc` is not a number")
        );
    }

    #[test]
    fn infinities_parse_and_malformed_labels_are_refused() {
        let lines = parse_text("y +Inf\nz{} -Inf\n").expect("parses");
        assert_eq!(lines[0].value, f64::INFINITY);
        assert_eq!(lines[1].value, f64::NEG_INFINITY);
        assert!(parse_text("x{a=1} 2").is_err(), "an unquoted value");
        assert!(parse_text("x{a} 2").is_err(), "a label without =");
        assert!(parse_text("novalue").is_err());
    }

    /// Found by the `prometheus_text` fuzz target: a line whose `{` was lost was read as a
    /// sample of a metric named `x",id="/x",...}`. Names are checked now.
    #[test]
    fn a_line_missing_its_brace_is_refused_not_read_as_a_strange_metric() {
        let e = parse_text(
            "ok 1\ncontainer_cpu_usage_se\",id=\"/x\",namespace=\"research\",pod=\"train\"} 3000 1763892000000\n",
        )
        .expect_err("a broken line");
        assert!(
            e.starts_with("line 2: ") && e.contains("is not a metric name"),
            "{e}"
        );
        assert!(parse_text("a}b 1").is_err());
        assert!(parse_text("1x 1").is_err());
        assert!(
            parse_text("x{a b=\"1\"} 1").is_err(),
            "a label name with a space"
        );
        assert!(
            parse_text("x{\"a\"=\"1\"} 1").is_err(),
            "a quoted label name"
        );
        assert!(
            parse_text("ns:x_total{_a1=\"\"} 1").is_ok(),
            "colons, underscores, digits"
        );
    }
}
