//! `ferro man DIR` (hidden, for packaging: tools/package): the man pages of `ferro` and of
//! every subcommand, generated from the CLI's own definition so they cannot drift from
//! `--help`. Runs on the calling thread.

use std::path::Path;

/// Writes `ferro.1` and one page per subcommand at every level (`ferro-vm.1`,
/// `ferro-vm-start.1`, ...) into `dir`, creating it if needed. Hidden subcommands (this one)
/// and clap's `help` get no page. `date` (of the release, e.g. its commit's) goes in each
/// page's footer; it must not be empty, or man reads the footer's fields out of place.
pub fn write(command: clap::Command, dir: &Path, date: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Every page's footer names the program and its version, not the subcommand's name.
    let footer = Footer {
        date,
        source: &format!("ferro {}", command.get_version().unwrap_or_default()),
    };
    // Built (after dropping `help`), each subcommand knows its full name: `ferro-vm-start`.
    let mut command = command.disable_help_subcommand(true);
    command.build();
    write_tree(&command, dir, &footer)
}

struct Footer<'a> {
    date: &'a str,
    source: &'a str,
}

fn write_tree(command: &clap::Command, dir: &Path, footer: &Footer) -> std::io::Result<()> {
    clap_mangen::Man::new(command.clone())
        .date(footer.date)
        .source(footer.source)
        .manual("Ferro Manual")
        .generate_to(dir)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_tree(sub, dir, footer)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use clap::CommandFactory;

    use super::*;

    fn pages() -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        write(
            crate::Cli::command(),
            &dir.path().join("man1"),
            "2026-01-02",
        )
        .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("man1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        (dir, names)
    }

    fn page(dir: &tempfile::TempDir, name: &str) -> String {
        std::fs::read_to_string(dir.path().join("man1").join(name)).unwrap()
    }

    #[test]
    fn every_visible_subcommand_gets_a_page_and_hidden_ones_none() {
        let (_dir, names) = pages();
        for expected in [
            "ferro.1",
            "ferro-run.1",
            "ferro-daemon.1",
            "ferro-vm.1",
            "ferro-vm-start.1",
            "ferro-vol-snapshot-create.1",
            "ferro-net-leases.1",
            "ferro-completions.1",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
        }
        assert!(
            names
                .iter()
                .all(|n| !n.starts_with("ferro-man") && !n.contains("-help") && n.ends_with(".1")),
            "{names:?}"
        );
        // One page per command at every level: the root, its subcommands, theirs...
        fn commands(c: &clap::Command) -> usize {
            let below = c.get_subcommands().filter(|s| !s.is_hide_set());
            1 + below.map(commands).sum::<usize>()
        }
        assert_eq!(names.len(), commands(&crate::Cli::command()));
    }

    #[test]
    fn pages_carry_the_help_text_defaults_environment_and_footer() {
        let (dir, _) = pages();
        let daemon = page(&dir, "ferro-daemon.1");
        let footer = format!(
            ".TH ferro-daemon 1 2026-01-02 \"ferro {}\" \"Ferro Manual\"",
            env!("CARGO_PKG_VERSION")
        );
        assert!(daemon.contains(&footer), "lacks {footer}:\n{daemon}");
        for needle in ["state\\-dir", "/var/lib/ferro", "group `ferro`"] {
            assert!(daemon.contains(needle), "lacks {needle}:\n{daemon}");
        }
        let start = page(&dir, "ferro-vm-start.1");
        assert!(start.contains("FERRO_SOCKET"), "{start}");
        let root = page(&dir, "ferro.1");
        assert!(root.contains("ferro\\-vm(1)"), "{root}");
        assert!(!root.contains("ferro\\-man"), "{root}");
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(write(crate::Cli::command(), &file.join("man1"), "2026-01-02").is_err());
    }
}
