//! `serve --config FILE`: every `serve` option in a TOML file, under the
//! same names as the flags (`api-listen = "127.0.0.1:8443"`).
//!
//! The file is turned into the flags it stands for, in front of the command
//! line, so that a flag given on the command line or in its `FLEETGATE_*`
//! variable wins over the file, and every value goes through the very
//! parser its flag has. A key that is no option, a value of the wrong kind
//! or one its parser refuses is an error naming the file, the line and the
//! key (exit 64), never ignored.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Args;

use super::serve_args::ServeArgs;

/// What is wrong with a configuration file: where, and why.
#[derive(Debug)]
pub(super) struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub why: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ": {k}")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// The `serve` command's options, as clap knows them.
fn serve_command() -> clap::Command {
    ServeArgs::augment_args(clap::Command::new("serve"))
}

/// Options that make no sense in the file itself.
const NOT_IN_FILE: [&str; 2] = ["config", "help"];

/// One option from a file: its flag and values (several for a list).
#[derive(Debug, PartialEq)]
pub(super) struct Setting {
    pub key: String,
    pub values: Vec<String>,
    pub line: usize,
}

impl Setting {
    /// The flags it stands for: `--key=value` for each value, `--key` for
    /// a flag that is on.
    fn flags(&self) -> impl Iterator<Item = String> + '_ {
        self.values.iter().map(|v| {
            if v.is_empty() {
                format!("--{}", self.key)
            } else {
                format!("--{}={v}", self.key)
            }
        })
    }
}

/// Reads and checks `path`: every key an option of `serve`, every value
/// one its flag takes.
pub(super) fn read(path: &Path) -> Result<Vec<Setting>, ConfigError> {
    let err = |line: Option<usize>, key: Option<&str>, why: String| ConfigError {
        file: path.to_owned(),
        line,
        key: key.map(str::to_owned),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(None, None, e.to_string()))?;
    parse(&text).map_err(|(line, key, why)| err(line, key.as_deref(), why))
}

type ParseError = (Option<usize>, Option<String>, String);

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> Option<usize> {
    span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
}

/// [`read`] of a file's text.
pub(super) fn parse(text: &str) -> Result<Vec<Setting>, ParseError> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        (
            line_of(text, e.span()),
            None,
            format!("not TOML: {}", e.message()),
        )
    })?;
    let cmd = serve_command();
    let mut out = Vec::new();
    for (key, item) in doc.as_table().iter() {
        let (k, _) = doc
            .as_table()
            .get_key_value(key)
            .expect("the key just listed");
        let line = line_of(text, k.span()).unwrap_or(0);
        let fail = |why: String| (Some(line), Some(key.to_owned()), why);
        let value = item
            .as_value()
            .ok_or_else(|| fail("a table, not a value: options are top-level keys".into()))?;
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key))
            .filter(|_| !NOT_IN_FILE.contains(&key))
            .ok_or_else(|| {
                let hint = cmd
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .find(|l| l.replace('-', "_") == key.replace('-', "_"))
                    .map(|l| format!(" (did you mean {l}?)"))
                    .unwrap_or_default();
                fail(format!(
                    "no such option{hint}; `fleetgate config example` lists them all"
                ))
            })?;
        let flag = !arg.get_action().takes_values();
        let many = matches!(arg.get_action(), clap::ArgAction::Append);
        let values = match value {
            toml_edit::Value::Boolean(b) if flag => {
                if *b.value() {
                    vec![String::new()]
                } else {
                    vec![]
                }
            }
            _ if flag => return Err(fail("takes true or false".into())),
            toml_edit::Value::Array(a) if many => a
                .iter()
                .map(|v| {
                    scalar(v).ok_or_else(|| fail("list items must be strings or numbers".into()))
                })
                .collect::<Result<_, _>>()?,
            toml_edit::Value::Array(_) => {
                return Err(fail("takes one value, not a list".into()));
            }
            v => vec![scalar(v).ok_or_else(|| fail("takes a string or a number".into()))?],
        };
        for v in &values {
            if flag {
                continue;
            }
            // The flag's own parser, alone on a command line: a value it
            // refuses is this key's error (a missing companion option is
            // not: another key may give it).
            let alone = cmd
                .clone()
                .try_get_matches_from(["serve", &format!("--{key}={v}")]);
            if let Err(e) = alone {
                use clap::error::ErrorKind as K;
                if matches!(
                    e.kind(),
                    K::InvalidValue | K::ValueValidation | K::InvalidUtf8
                ) {
                    let e = e.to_string();
                    let first = e.lines().next().unwrap_or("").trim_start_matches("error: ");
                    return Err(fail(format!("bad value {v:?}: {first}")));
                }
            }
        }
        out.push(Setting {
            key: key.to_owned(),
            values,
            line,
        });
    }
    Ok(out)
}

fn scalar(v: &toml_edit::Value) -> Option<String> {
    Some(match v {
        toml_edit::Value::String(s) => s.value().clone(),
        toml_edit::Value::Integer(i) => i.value().to_string(),
        toml_edit::Value::Float(f) => f.value().to_string(),
        toml_edit::Value::Boolean(b) => b.value().to_string(),
        _ => return None,
    })
}

/// The command line with the file's options put in front of `serve`'s own
/// (when `serve --config FILE` or `FLEETGATE_CONFIG` names one): each
/// option the command line or its environment variable does not already
/// set, as a flag.
pub(super) fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(serve) = argv.iter().position(|a| a == "serve") else {
        return Ok(argv);
    };
    let Some(path) = config_path(&argv[serve + 1..]) else {
        return Ok(argv);
    };
    let settings = read(&path)?;
    let cmd = serve_command();
    let mut out: Vec<OsString> = argv[..=serve].to_vec();
    for s in settings
        .iter()
        .filter(|s| !set_outside(&cmd, &argv[serve + 1..], &s.key))
    {
        out.extend(s.flags().map(OsString::from));
    }
    out.extend_from_slice(&argv[serve + 1..]);
    Ok(out)
}

/// Whether option `key` is set outside the file, on `serve`'s command line
/// (`args`) or in its environment variable: then the file does not set it.
fn set_outside(cmd: &clap::Command, args: &[OsString], key: &str) -> bool {
    args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{key}") || a.starts_with(&format!("--{key}="))
    }) || cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(key))
        .and_then(|a| a.get_env())
        .is_some_and(|env| std::env::var_os(env).is_some())
}

/// `--config FILE`, `--config=FILE`, or `FLEETGATE_CONFIG`.
pub(super) fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("FLEETGATE_CONFIG").map(PathBuf::from)
}

/// `fleetgate config example`: every option of `serve`, its help as a
/// comment and its default, commented out (a file of only comments means
/// every default).
pub(super) fn example() -> String {
    let mut out = String::from(
        "# fleetgate serve's configuration (TOML): `fleetgate serve --config FILE`.\n\
         # Every option has the name of its flag; a flag on the command line, or its\n\
         # FLEETGATE_* variable, wins over the file. Unknown keys are refused.\n\
         # `fleetgate check --config FILE` checks a file without starting.\n",
    );
    let cmd = serve_command();
    let mut heading = None;
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_IN_FILE.contains(&long) || arg.is_hide_set() {
            continue;
        }
        if arg.get_help_heading() != heading {
            heading = arg.get_help_heading();
            if let Some(h) = heading {
                out.push_str(&format!("\n# --- {h} ---\n"));
            }
        }
        out.push('\n');
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in textwrap(&help, 76) {
            out.push_str(&format!("# {line}\n"));
        }
        if let Some(env) = arg.get_env() {
            out.push_str(&format!("# (environment: {})\n", env.to_string_lossy()));
        }
        if AT_RUN_TIME.contains(&long) {
            out.push_str("# (a new value applies on SIGHUP, without a restart)\n");
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        let flag = !arg.get_action().takes_values();
        let many = matches!(arg.get_action(), clap::ArgAction::Append);
        let value = match (flag, many, defaults.as_slice()) {
            (true, _, _) => "false".to_owned(),
            (_, true, d) => format!(
                "[{}]",
                d.iter()
                    .map(|v| toml_value(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (_, _, [d]) => toml_value(d),
            _ => {
                out.push_str(&format!("# {long} =   (no default)\n"));
                continue;
            }
        };
        out.push_str(&format!("# {long} = {value}\n"));
    }
    out
}

/// A default as TOML: numbers bare, the rest quoted.
fn toml_value(v: &str) -> String {
    if v.parse::<i64>().is_ok() || v.parse::<f64>().is_ok_and(f64::is_finite) {
        v.to_owned()
    } else {
        format!("{v:?}")
    }
}

fn textwrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

/// What a running `serve --config` re-reads on SIGHUP: the file's
/// settings at start, and the keys the command line or environment set
/// (the file does not change those).
pub(super) struct Reloader {
    path: PathBuf,
    running: std::collections::BTreeMap<String, Vec<String>>,
    overridden: Vec<String>,
}

/// The keys a running node takes from a new file without a restart (see
/// [`Reloader::reload`]).
pub(super) const AT_RUN_TIME: [&str; 4] = [
    "log-level",
    "max-subscriptions",
    "new-topics-per-minute",
    "max-packet-size",
];

impl Reloader {
    pub(super) fn new(argv: &[OsString]) -> Result<Option<Self>, ConfigError> {
        let Some(serve) = argv.iter().position(|a| a == "serve") else {
            return Ok(None);
        };
        let Some(path) = config_path(&argv[serve + 1..]) else {
            return Ok(None);
        };
        let settings = read(&path)?;
        let cmd = serve_command();
        let overridden = settings
            .iter()
            .filter(|s| set_outside(&cmd, &argv[serve + 1..], &s.key))
            .map(|s| s.key.clone())
            .collect();
        Ok(Some(Self {
            running: settings.into_iter().map(|s| (s.key, s.values)).collect(),
            path,
            overridden,
        }))
    }

    /// Reads the file again: applies what can change at run time (the log
    /// level; TLS and signer files are re-read by SIGHUP anyway) and says
    /// what changed that needs a restart.
    pub(super) fn reload(&mut self) -> Result<(String, crate::mqtt::Retune), String> {
        let now: std::collections::BTreeMap<String, Vec<String>> = read(&self.path)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|s| (s.key, s.values))
            .collect();
        let mut changed: Vec<&String> = now
            .keys()
            .chain(self.running.keys())
            .filter(|k| now.get(*k) != self.running.get(*k))
            .collect();
        changed.sort();
        changed.dedup();
        let (mut applied, mut restart, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
        let mut retune = crate::mqtt::Retune::default();
        let cmd = serve_command();
        // The file's value, or the flag's default when the key is gone.
        let value = |key: &str| -> String {
            now.get(key)
                .and_then(|v| v.first().cloned())
                .or_else(|| {
                    cmd.get_arguments()
                        .find(|a| a.get_long() == Some(key))
                        .and_then(|a| a.get_default_values().first().cloned())
                        .map(|d| d.to_string_lossy().into_owned())
                })
                .unwrap_or_default()
        };
        for key in changed {
            if self.overridden.contains(key) {
                ignored.push(key.clone());
                continue;
            }
            let v = value(key);
            let number = || v.parse::<u64>().map_err(|e| format!("{key} = {v:?}: {e}"));
            match key.as_str() {
                "log-level" => {
                    super::set_log_filter(&v).map_err(|e| format!("log-level {v:?}: {e}"))?;
                }
                "max-subscriptions" => {
                    retune.max_subscriptions =
                        Some(usize::try_from(number()?).map_err(|e| format!("{key}: {e}"))?)
                }
                "new-topics-per-minute" => {
                    retune.new_topics_per_minute =
                        Some(u32::try_from(number()?).map_err(|e| format!("{key}: {e}"))?)
                }
                // Clamped as `serve` takes it at start.
                "max-packet-size" => {
                    let n = usize::try_from(number()?).map_err(|e| format!("{key}: {e}"))?;
                    retune.max_packet_size = Some(n.clamp(64, 256 * 1024 * 1024));
                }
                _ => {
                    restart.push(key.clone());
                    continue;
                }
            }
            applied.push(format!("{key} = {v:?}"));
        }
        self.running = now;
        let list = |v: &[String]| {
            if v.is_empty() {
                "nothing".to_owned()
            } else {
                v.join(", ")
            }
        };
        Ok((
            format!(
                "applied {}; needs a restart: {}; set on the command line or environment, so \
                 unchanged: {}",
                list(&applied),
                list(&restart),
                list(&ignored)
            ),
            retune,
        ))
    }
}

/// The command line a file stands for, for [`ServeArgs`] alone (`check
/// --config`).
pub(super) fn serve_args_from(path: &Path) -> Result<ServeArgs, ConfigError> {
    let settings = read(path)?;
    let mut argv: Vec<String> = vec!["serve".into()];
    argv.extend(settings.iter().flat_map(Setting::flags));
    let m = serve_command()
        .try_get_matches_from(argv)
        .map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            key: None,
            why: e.to_string().lines().next().unwrap_or("").to_owned(),
        })?;
    <ServeArgs as clap::FromArgMatches>::from_arg_matches(&m).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        key: None,
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_a_flag_and_values_go_through_its_parser() {
        let s = parse(
            "# a node\napi-listen = \"127.0.0.1:9443\"\nmax-connections = 5000\n\
             san = [\"broker.example\", \"10.0.0.1\"]\nconnect-rate-per-ip = 2.5\n",
        )
        .unwrap();
        assert_eq!(s[0].key, "api-listen");
        assert_eq!(s[0].line, 2);
        assert_eq!(s[1].values, ["5000"]);
        assert_eq!(s[2].values, ["broker.example", "10.0.0.1"]);
        assert_eq!(s[3].values, ["2.5"]);
    }

    #[test]
    fn refuses_with_the_line_and_the_key() {
        for (text, line, key, says) in [
            (
                "\n\napi_listen = \"x\"\n",
                3,
                "api_listen",
                "did you mean api-listen?",
            ),
            (
                "mqtt-listen = \"nowhere\"\n",
                1,
                "mqtt-listen",
                "bad value \"nowhere\"",
            ),
            (
                "max-connections = \"many\"\n",
                1,
                "max-connections",
                "bad value",
            ),
            (
                "max-connections = [1, 2]\n",
                1,
                "max-connections",
                "not a list",
            ),
            ("[mqtt]\nlisten = 1\n", 1, "mqtt", "a table"),
            ("config = \"/etc/x\"\n", 1, "config", "no such option"),
        ] {
            let (l, k, why) = parse(text).unwrap_err();
            assert_eq!(l, Some(line), "{text}: {why}");
            assert_eq!(k.as_deref(), Some(key), "{text}");
            assert!(why.contains(says), "{text}: {why}");
        }
        let (l, k, why) = parse("a = \n").unwrap_err();
        assert_eq!((l, k), (Some(1), None), "{why}");
        assert!(why.contains("not TOML"), "{why}");
    }

    #[test]
    fn the_example_parses_with_every_default_uncommented() {
        let text = example();
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains(" = ") && !l.ends_with("(no default)"))
            .filter(|l| {
                l.split(' ')
                    .next()
                    .is_some_and(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let settings = parse(&uncommented).unwrap_or_else(|e| panic!("{e:?}\n{uncommented}"));
        assert!(settings.len() > 30, "{uncommented}");
        assert!(text.contains("# api-listen = \"127.0.0.1:8443\""), "{text}");
        assert_eq!(
            text.matches("a new value applies on SIGHUP").count(),
            AT_RUN_TIME.len(),
            "{text}"
        );
    }

    #[test]
    fn command_line_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fg.toml");
        std::fs::write(
            &f,
            "api-listen = \"127.0.0.1:1111\"\nmqtt-listen = \"127.0.0.1:2222\"\n",
        )
        .unwrap();
        let argv: Vec<OsString> = [
            "fleetgate",
            "serve",
            "--config",
            f.to_str().unwrap(),
            "--api-listen",
            "127.0.0.1:3333",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out: Vec<String> = expand(argv)
            .unwrap()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            out.contains(&"--mqtt-listen=127.0.0.1:2222".to_owned()),
            "{out:?}"
        );
        assert!(!out.iter().any(|a| a.contains("1111")), "{out:?}");
        assert!(out.contains(&"127.0.0.1:3333".to_owned()), "{out:?}");
    }
}
