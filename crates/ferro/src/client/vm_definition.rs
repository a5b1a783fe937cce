//! `ferro vm define`, `vm dump` and `vm edit`: VM definitions as files, checked here with the
//! rules the daemon applies (`api::definition_file`) before they are sent. Single-threaded;
//! `vm edit` waits for the editor it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use api::daemon_api::{paths, VmDefinition, VmDetails};
use api::definition_file::{parse_vm, vm_to_toml};
use http_unix::Client;

use super::{call, decode, Failure, Outcome};

/// Sends `definition` to the daemon: a new VM, or an existing one's new definition.
fn send(c: &Client, definition: &VmDefinition) -> Result<VmDetails, Failure> {
    let body = serde_json::to_vec(definition).map_err(|e| Failure(1, e.to_string()))?;
    let response = call(c, "POST", paths::VMS, Some(body))?;
    let details: VmDetails = decode(&response)?;
    let name = &definition.name;
    match (response.status, details.pending_definition.is_some()) {
        (201, _) => println!("VM {name} defined"),
        (_, true) => println!("VM {name} updated; it runs on as it is until its next start"),
        (_, false) => println!("VM {name} updated"),
    }
    Ok(details)
}

pub(crate) fn define(c: &Client, file: &Path) -> Outcome {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure(2, format!("cannot read {}: {e}", file.display())))?;
    let definition = parse_vm(&text).map_err(|e| Failure(2, format!("{}: {e}", file.display())))?;
    send(c, &definition).map(drop)
}

/// The definition a new start of `name` would use, as TOML.
fn current_toml(c: &Client, name: &str) -> Result<String, Failure> {
    let details: VmDetails = decode(&call(c, "GET", &paths::vm(name), None)?)?;
    vm_to_toml(details.next_definition()).map_err(|e| Failure(1, e))
}

pub(crate) fn dump(c: &Client, name: &str) -> Outcome {
    print!("{}", current_toml(c, name)?);
    Ok(())
}

pub(crate) fn edit(c: &Client, name: &str) -> Outcome {
    let before = current_toml(c, name)?;
    let file = edit_file(name);
    write_private(&file, &before)
        .map_err(|e| Failure(1, format!("cannot write {}: {e}", file.display())))?;
    let outcome = edit_and_send(c, name, &file, &before);
    // A refused edit stays on disk, so the work is not lost.
    if outcome.is_ok() {
        let _ = std::fs::remove_file(&file);
    }
    outcome
}

/// A file of this user's own for the edit (mode 0600: a definition may name private paths).
fn edit_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ferro-{name}-{}.toml", std::process::id()))
}

fn write_private(file: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)?
        .write_all(text.as_bytes())
}

fn edit_and_send(c: &Client, name: &str, file: &Path, before: &str) -> Outcome {
    run_editor(file)?;
    let kept = |message: String| {
        Failure(
            2,
            format!(
                "{message}; nothing was changed, and the edited definition is kept in {} \
                 (fix it and `ferro vm define` it)",
                file.display()
            ),
        )
    };
    let after = std::fs::read_to_string(file)
        .map_err(|e| Failure(1, format!("cannot read {}: {e}", file.display())))?;
    if after == before {
        println!("VM {name} unchanged");
        return Ok(());
    }
    let definition = parse_vm(&after).map_err(kept)?;
    if definition.name != name {
        return Err(kept(format!(
            "the edited definition names VM {:?}: `vm edit` cannot rename a VM",
            definition.name
        )));
    }
    send(c, &definition)
        .map(drop)
        .map_err(|Failure(code, message)| match code {
            2 => kept(message),
            _ => Failure(code, message),
        })
}

/// Runs $VISUAL, else $EDITOR, else vi, on `file` through the shell (an editor given with
/// options works, as with git).
fn run_editor(file: &Path) -> Outcome {
    let editor = ["VISUAL", "EDITOR"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()))
        .unwrap_or_else(|| "vi".into());
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file)
        .status()
        .map_err(|e| Failure(1, format!("cannot run the editor {editor:?}: {e}")))?;
    if !status.success() {
        let _ = std::fs::remove_file(file);
        return Err(Failure(
            1,
            format!("the editor {editor:?} failed ({status}); nothing was changed"),
        ));
    }
    Ok(())
}
