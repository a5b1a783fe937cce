//! `ferro img check`: a [`Scan`] of the image and, with `--repair`, what [`super::repair`]
//! fixes from it, then a second scan to report what is left. Runs on the caller's thread.

use std::fs::File;
use std::io;

use super::scan::{CheckReport, Scan};

/// Checks the qcow2 image in `file` (locked by the caller: shared to check, exclusive to
/// repair). With `repair`, fixes what it can ([`super::repair`]) and checks again: the report
/// is then the second check's, with the counts of what was fixed.
pub fn check(file: &File, repair: bool) -> io::Result<CheckReport> {
    let first = Scan::run(file)?;
    if !repair {
        return Ok(first.report);
    }
    let found = (first.report.corruptions, first.report.leaks);
    let mut repairs = super::repair::repair(file, &first)?;
    let last = match repairs.is_empty() {
        true => first,
        false => Scan::run(file)?,
    };
    repairs.extend(super::repair::clear_flags(file, &last)?);
    let mut report = last.report;
    report.corruptions_fixed = found.0.saturating_sub(report.corruptions);
    report.leaks_fixed = found.1.saturating_sub(report.leaks);
    report.repairs = repairs;
    Ok(report)
}
