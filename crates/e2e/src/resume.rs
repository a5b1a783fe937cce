//! Resuming a test run after the testbed's outer host died: `tools/testbed` lists what earlier
//! attempts finished in `$TESTBED_DONE` and takes `done=NAME` lines on `$TESTBED_STATUS`.
//! Outside the nested testbed neither variable is set and nothing is skipped.

use std::collections::HashSet;
use std::io::Write;

use libtest_mimic::{Failed, Trial};

/// A test: its name and its body.
pub type Test = (&'static str, fn() -> Result<(), Failed>);

/// Names that passed in an earlier attempt of the outer host.
fn finished_earlier() -> HashSet<String> {
    std::env::var_os("TESTBED_DONE")
        .and_then(|path| std::fs::read_to_string(path).ok())
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Tells the testbed that `name` passed, so a restarted outer host skips it.
fn report_passed(name: &str) {
    let Some(port) = std::env::var_os("TESTBED_STATUS") else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(&port)
        .and_then(|mut f| f.write_all(format!("done={name}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot report {name} to the testbed: {e}");
    }
}

/// The trials for `tests`, without the ones that passed in an earlier attempt (named on
/// stderr), each reporting its own pass.
pub fn trials(tests: &[Test]) -> Vec<Trial> {
    let earlier = finished_earlier();
    let (skipped, to_run): (Vec<_>, Vec<_>) = tests
        .iter()
        .copied()
        .partition(|(name, _)| earlier.contains(*name));
    if !skipped.is_empty() {
        let names: Vec<_> = skipped.iter().map(|(name, _)| *name).collect();
        eprintln!(
            "passed before the outer host was restarted, not run again: {}",
            names.join(" ")
        );
    }
    to_run
        .into_iter()
        .map(|(name, body)| {
            Trial::test(name, move || {
                body()?;
                report_passed(name);
                Ok(())
            })
        })
        .collect()
}
