//! The run's network, as the harness will use it: three namespaces on a
//! switch reach each other; a partition cuts exactly the pair it names,
//! both ways; healing joins them again. Real namespaces and sockets (as
//! root, with iproute2 and python3).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faults::net::Net;

/// Whether member `from` gets the listener's greeting from `to` within a
/// second.
fn reaches(net: &Net, from: usize, to: usize) -> bool {
    let code = format!(
        "import socket,sys\n\
         try:\n    s=socket.create_connection(('{}',7000),timeout=1)\n    sys.exit(0 if s.recv(2)==b'hi' else 1)\n\
         except OSError:\n    sys.exit(1)",
        net.addr(to)
    );
    net.command(from, "python3")
        .args(["-c", &code])
        .status()
        .unwrap()
        .success()
}

struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listen(net: &Net, i: usize) -> Listener {
    let code = format!(
        "import socket\n\
         s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{}',7000)); s.listen()\n\
         while True:\n    c,_=s.accept(); c.sendall(b'hi'); c.close()",
        net.addr(i)
    );
    Listener(
        net.command(i, "python3")
            .args(["-c", &code])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_partition_cuts_the_pair_it_names_and_healing_joins_it_again() {
    let net = Net::new(&format!("fgt{}n", std::process::id()), 3).unwrap();
    let _l0 = listen(&net, 0);
    let _l2 = listen(&net, 2);
    // Waits for the listener, polling with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reaches(&net, 1, 0) {
        assert!(Instant::now() < deadline, "member 1 never reached member 0");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reaches(&net, 2, 0));

    net.partition(0, 1).unwrap();
    assert!(!reaches(&net, 1, 0), "a partition lets traffic through");
    assert!(
        reaches(&net, 2, 0),
        "a partition cut a pair it does not name"
    );
    assert!(
        reaches(&net, 1, 2),
        "a partition cut a pair it does not name"
    );

    net.heal(0, 1).unwrap();
    assert!(reaches(&net, 1, 0), "healing did not join them again");
    let name = net.ns(0);
    drop(net);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&name),
        "a namespace was left behind"
    );
}
