use super::*;
use crate::vm_config::MAX_NICS;

fn parse(json: &str) -> VmDefinition {
    serde_json::from_str(json).unwrap()
}

fn volumes_as(format: &'static str) -> impl Fn(&str, &str) -> Result<ResolvedVolume, String> {
    move |pool, volume| {
        Ok(ResolvedVolume {
            path: format!("/pools/{pool}/{volume}").into(),
            format: format.into(),
        })
    }
}

/// A definition that names only the kernel runs the VM `ferro run --kernel` would.
#[test]
fn a_bare_definition_has_the_vmm_defaults() {
    let def = parse(r#"{"name": "web", "kernel": "/k"}"#);
    assert_eq!(def.config, VmConfig::new("/k"));
    assert_eq!((def.id, def.autostart), (None, false));
}

/// The JSON the daemon's API has always taken and answered, field for field.
#[test]
fn the_rest_shape_is_unchanged() {
    let json = serde_json::json!({
        "name": "web", "id": 3, "cpus": 2, "memory": "1G", "kernel": "/k", "initrd": "/i",
        "cmdline": "console=hvc0",
        "disks": [
            {"path": "/d.qcow2", "readonly": true, "serial": "s", "format": "qcow2",
             "backing_dir": "/b", "num_queues": 2},
            {"volume": "p/v", "readonly": false}
        ],
        "nets": [{"network": "lab", "mac": "52:54:00:12:34:56"}, {"tap": "t0", "queue_pairs": 2}],
        "rng": true, "rng_bytes_per_sec": 4096, "rng_period_ms": 50,
        "console": "hvc", "autostart": true
    });
    let def: VmDefinition = serde_json::from_value(json.clone()).unwrap();
    def.validate().unwrap();
    assert_eq!(def.config.disks[1].volume_ref(), Some(("p", "v")));
    assert_eq!(def.config.nets[1].tap(), Some("t0"));
    assert_eq!(def.config.cpus, 2);
    assert_eq!(serde_json::to_value(&def).unwrap(), json);
}

#[test]
fn networks_get_their_tap_once_the_vm_has_an_id() {
    let def =
        parse(r#"{"name": "a", "kernel": "/k", "nets": [{"network": "lab"}, {"tap": "t0"}]}"#);
    def.validate().unwrap();
    let err = def.resolved_config(volumes_as("raw")).unwrap_err();
    assert!(err.contains("has no id yet"), "{err}");
    let def = VmDefinition { id: Some(5), ..def };
    let config = def.resolved_config(volumes_as("raw")).unwrap();
    assert_eq!(config.nets[0].tap(), Some("fv5n0"));
    assert_eq!(config.nets[1].tap(), Some("t0"));
    config.into_runnable().unwrap();
    let many = format!(
        r#"{{"name": "a", "kernel": "/k", "nets": [{}]}}"#,
        vec![r#"{"network": "lab"}"#; MAX_NICS + 1].join(",")
    );
    let err = parse(&many).validate().unwrap_err();
    assert!(err.contains("a VM has at most 32"), "{err}");
}

#[test]
fn dns_names_are_labels_not_all_digits() {
    for (name, dns) in [
        ("web1", true),
        ("ignore", true),
        ("5m", true),
        ("123", false),
        ("db_1", false),
        ("a.b", false),
        ("x-", false),
        (&"a".repeat(64), false),
    ] {
        let def = VmDefinition::new(name, VmConfig::new("/k"));
        assert_eq!(def.dns_name().is_some(), dns, "{name}");
    }
}

#[test]
fn disks_name_a_path_or_a_volume() {
    let def = parse(
        r#"{"name": "a", "kernel": "/k", "disks": [{"volume": "p/v.qcow2"}, {"path": "/d", "format": "raw", "num_queues": 3, "backing_dir": "/bases"}]}"#,
    );
    def.validate().unwrap();
    let config = def.resolved_config(volumes_as("qcow2")).unwrap();
    assert_eq!(config.disks[0].path(), Some(Path::new("/pools/p/v.qcow2")));
    assert_eq!(config.disks[0].format.as_deref(), Some("qcow2"));
    assert_eq!(config.disks[0].num_queues, None);
    assert_eq!(config.disks[1], def.config.disks[1], "a path disk is kept");
    for bad in [
        r#"[{"volume": "no-slash"}]"#,
        r#"[{"volume": "p/../x"}]"#,
        r#"[{"path": "rel", "format": "raw"}]"#,
        r#"[{"path": "/d", "format": "raw", "num_queues": 0}]"#,
        r#"[{"path": "/d", "format": "raw", "num_queues": 65}]"#,
        r#"[{"path": "/d", "format": "vmdk"}]"#,
        r#"[{"path": "/d", "format": "raw", "backing_dir": "rel"}]"#,
        r#"[{"volume": "p/v", "backing_dir": "/bases"}]"#,
    ] {
        let json = format!(r#"{{"name": "a", "kernel": "/k", "disks": {bad}}}"#);
        assert!(parse(&json).validate().is_err(), "{bad}");
    }
    // Neither or both sources cannot even be read.
    for bad in [
        r#"[{"path": "/d", "volume": "p/v"}]"#,
        r#"[{"readonly": true}]"#,
    ] {
        let json = format!(r#"{{"name": "a", "kernel": "/k", "disks": {bad}}}"#);
        assert!(
            serde_json::from_str::<VmDefinition>(&json).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn a_disk_format_is_never_left_to_a_guess() {
    let def = parse(r#"{"name": "a", "kernel": "/k", "disks": [{"path": "/d"}]}"#);
    let err = def.validate().unwrap_err();
    assert!(err.contains("needs a format"), "{err}");
    def.validate_stored().unwrap();
    // A volume's recorded format wins; a definition that contradicts it is refused.
    let def =
        parse(r#"{"name": "a", "kernel": "/k", "disks": [{"volume": "p/v", "format": "qcow2"}]}"#);
    def.validate().unwrap();
    let err = def.resolved_config(volumes_as("raw")).unwrap_err();
    assert!(err.contains("is raw, but the definition says"), "{err}");
}

#[test]
fn definitions_refuse_unknown_fields_and_relative_paths() {
    let json = r#"{"name": "a", "kernel": "/k", "cpu": 2}"#;
    let err = serde_json::from_str::<VmDefinition>(json).unwrap_err();
    assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
    let err =
        serde_json::from_str::<VmDefinition>(r#"{"name": "a", "kernel": "/k", "no_reboot": true}"#)
            .unwrap_err();
    assert!(
        err.to_string().contains("unknown field `no_reboot`"),
        "{err}"
    );
    let err = parse(r#"{"name": "a", "kernel": "k"}"#)
        .validate()
        .unwrap_err();
    assert_eq!(err, "the kernel path k must be absolute");
    let err = parse(r#"{"name": "a", "kernel": "/k", "cpus": 0}"#)
        .validate()
        .unwrap_err();
    assert_eq!(err, "a VM needs at least one vCPU");
    let err = parse(r#"{"name": "a/b", "kernel": "/k"}"#)
        .validate()
        .unwrap_err();
    assert!(err.contains("invalid VM name"), "{err}");
}
