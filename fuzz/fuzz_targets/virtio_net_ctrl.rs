//! The guest's virtio-net control commands: any bytes decode to a command without a panic,
//! and a queue pair count is accepted only within what the driver set up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::net::ctrl::{decide, parse, Command, ACK_ERR, ACK_OK};

fuzz_target!(|data: &[u8]| {
    let Some((&usable, command)) = data.split_first() else {
        return;
    };
    let usable = u16::from(usable).max(1);
    let parsed = parse(command);
    let (ack, pairs) = decide(&parsed, usable);
    match (parsed, pairs) {
        (Command::SetQueuePairs(wanted), Some(set)) => {
            assert_eq!(wanted, set);
            assert!((1..=usable).contains(&set));
            assert_eq!(ack, ACK_OK);
        }
        (_, None) => assert_eq!(ack, ACK_ERR),
        (other, Some(_)) => panic!("{other:?} changed the queue pairs"),
    }
});
