//! The line protocol between the kernel and the host, and its parser.
//!
//! The kernel writes plain text lines on port 0xE9 (and COM1). Lines that do
//! not start with one of the keywords below are ignored (the emulators add
//! their own banners around ours). Keywords:
//!
//! - `HELLO <text>`: the kernel is up.
//! - `INFO <key>=<value> ...`: what the CPU model offers (caps, versions).
//! - `CHECK <scenario> <text>`: one comparison inside a scenario, for logs.
//! - `QUIRK <scenario> <QUIRK_NAME> <text>`: a disagreement explained by a
//!   quirk the kernel lists by name (see the crate docs).
//! - `DIFF <scenario> <text>`: an unexplained disagreement.
//! - `RESULT <scenario> PASS|FAIL|SKIP [text]`: the scenario's verdict.
//! - `END PASS|FAIL`: the kernel finished; nothing follows.
//! - `PANIC <text>`: the kernel panicked (an `END FAIL` follows).

use std::fmt;

/// A scenario's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Emulator and model agree on every exit and every A/D bit.
    Pass,
    /// Agreement, except for disagreements explained by listed quirks.
    PassWithQuirks(Vec<String>),
    /// An unexplained disagreement (or an expectation not met).
    Fail,
    /// Not applicable to this CPU model (reason given).
    Skip,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Pass => f.write_str("PASS"),
            Outcome::PassWithQuirks(q) => write!(f, "PASS (quirk: {})", q.join(", ")),
            Outcome::Fail => f.write_str("FAIL"),
            Outcome::Skip => f.write_str("SKIP"),
        }
    }
}

/// One scenario's result as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Scenario name, e.g. `map-4k-read`.
    pub name: String,
    /// Verdict.
    pub outcome: Outcome,
    /// Text after the verdict (skip reason, failure summary).
    pub detail: String,
    /// `DIFF` lines (unexplained disagreements) for this scenario.
    pub diffs: Vec<String>,
    /// `QUIRK` lines for this scenario.
    pub quirks: Vec<String>,
}

/// Everything parsed from one kernel run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The kernel printed `HELLO`.
    pub booted: bool,
    /// `INFO` lines, without the keyword.
    pub info: Vec<String>,
    /// Scenarios in the order they ran.
    pub scenarios: Vec<Scenario>,
    /// The `END` verdict, if the kernel got that far.
    pub end: Option<bool>,
    /// `PANIC` text, if any.
    pub panic: Option<String>,
    /// `DIFF`/`QUIRK` lines whose scenario never reported a `RESULT`.
    pub orphans: Vec<String>,
}

/// Parse the kernel's output.
pub fn parse(output: &str) -> Parsed {
    let mut p = Parsed::default();
    let mut pending_diffs: Vec<(String, String)> = Vec::new();
    let mut pending_quirks: Vec<(String, String, String)> = Vec::new();
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        let (kw, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kw {
            "HELLO" => p.booted = true,
            "INFO" => p.info.push(rest.to_string()),
            "DIFF" => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                pending_diffs.push((name.to_string(), text.to_string()));
            }
            "QUIRK" => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let (quirk, text) = text.split_once(' ').unwrap_or((text, ""));
                pending_quirks.push((name.to_string(), quirk.to_string(), text.to_string()));
            }
            "RESULT" => {
                let mut it = rest.splitn(3, ' ');
                let name = it.next().unwrap_or("").to_string();
                let verdict = it.next().unwrap_or("");
                let detail = it.next().unwrap_or("").to_string();
                let diffs: Vec<String> = take_matching(&mut pending_diffs, &name, |d| d.1.clone());
                let quirk_lines: Vec<(String, String)> =
                    take_matching(&mut pending_quirks, &name, |q| (q.1.clone(), q.2.clone()));
                let mut names: Vec<String> = quirk_lines.iter().map(|q| q.0.clone()).collect();
                names.dedup();
                let outcome = match verdict {
                    "PASS" if !diffs.is_empty() => Outcome::Fail,
                    "PASS" if names.is_empty() => Outcome::Pass,
                    "PASS" => Outcome::PassWithQuirks(names),
                    "SKIP" => Outcome::Skip,
                    _ => Outcome::Fail,
                };
                let quirks = quirk_lines.into_iter().map(|(q, t)| format!("{q} {t}")).collect();
                p.scenarios.push(Scenario { name, outcome, detail, diffs, quirks });
            }
            "END" => p.end = Some(rest.trim() == "PASS"),
            "PANIC" => p.panic = Some(rest.to_string()),
            _ => {}
        }
    }
    p.orphans.extend(pending_diffs.into_iter().map(|d| format!("DIFF {} {}", d.0, d.1)));
    p.orphans.extend(pending_quirks.into_iter().map(|q| format!("QUIRK {} {} {}", q.0, q.1, q.2)));
    p
}

fn take_matching<T, U>(v: &mut Vec<T>, name: &str, f: impl Fn(&T) -> U) -> Vec<U>
where
    T: NameOf,
{
    let mut out = Vec::new();
    v.retain(|x| {
        if x.name_of() == name {
            out.push(f(x));
            false
        } else {
            true
        }
    });
    out
}

trait NameOf {
    fn name_of(&self) -> &str;
}
impl NameOf for (String, String) {
    fn name_of(&self) -> &str {
        &self.0
    }
}
impl NameOf for (String, String, String) {
    fn name_of(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_run() {
        let out = "Bochs banner\nHELLO kernel\nINFO cpu=vmx\nCHECK a ok\nRESULT a PASS\n\
                   QUIRK b QEMU_X reserved fault P=0\nRESULT b PASS\nDIFF c exit differs\n\
                   RESULT c PASS\nRESULT d SKIP no 1G pages\nRESULT e FAIL expectation\nEND FAIL\n";
        let p = parse(out);
        assert!(p.booted);
        assert_eq!(p.info, vec!["cpu=vmx"]);
        assert_eq!(p.end, Some(false));
        let o: Vec<_> = p.scenarios.iter().map(|s| (s.name.as_str(), s.outcome.clone())).collect();
        assert_eq!(
            o,
            vec![
                ("a", Outcome::Pass),
                ("b", Outcome::PassWithQuirks(vec!["QEMU_X".into()])),
                // A DIFF turns a kernel PASS into a failure: the host does not
                // trust the kernel's verdict alone.
                ("c", Outcome::Fail),
                ("d", Outcome::Skip),
                ("e", Outcome::Fail),
            ]
        );
        assert_eq!(p.scenarios[2].diffs, vec!["exit differs"]);
        assert_eq!(p.scenarios[3].detail, "no 1G pages");
        assert!(p.orphans.is_empty());
    }

    #[test]
    fn orphans_and_panic_are_kept() {
        let p = parse("HELLO\nDIFF x lost\nPANIC oops at foo\nEND FAIL\n");
        assert_eq!(p.orphans, vec!["DIFF x lost"]);
        assert_eq!(p.panic.as_deref(), Some("oops at foo"));
        assert_eq!(p.end, Some(false));
    }

    #[test]
    fn truncated_output_has_no_end() {
        let p = parse("HELLO\nRESULT a PASS\n");
        assert_eq!(p.end, None);
    }
}
