//! `keel-echo`: the workload of the tests and the demo, built into an image by the harness.
//! It serves on TCP and UDP port `$PORT` (8080), and says who it is: `$POD_NAME@$NODE_NAME`
//! (the pod's and the node's names, from the downward API; the host name when unset). To a line
//! it answers with that name and a newline; to an HTTP GET it answers 200 with that name as the
//! body (so HTTP probes and `wget` work) and the client's address as it sees it in an
//! `X-Client` header (what a NodePort's traffic policy changes); a datagram gets the name back. It writes one log
//! line when it starts, and exits with 0 on SIGTERM (the kernel's default for a signal it does
//! not catch would do too: it handles none).

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    thread,
};

fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "keel-echo".into());
    let pod = std::env::var("POD_NAME").unwrap_or(host);
    let name = match std::env::var("NODE_NAME") {
        Ok(node) if !node.is_empty() => format!("{pod}@{node}"),
        _ => pod,
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("keel-echo: listen on {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("keel-echo: {name} serving tcp and udp on port {port}");
    let udp_name = name.clone();
    thread::spawn(move || {
        let Ok(socket) = UdpSocket::bind(("0.0.0.0", port)) else {
            return;
        };
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{udp_name}\n").as_bytes(), from);
        }
    });
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        thread::spawn(move || serve(stream, &name));
    }
}

fn serve(stream: TcpStream, name: &str) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let client = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
        if line.starts_with("GET ") || line.starts_with("HEAD ") {
            // Skip the headers, answer, close.
            let mut header = String::new();
            while matches!(reader.read_line(&mut header), Ok(n) if n > 2) {
                header.clear();
            }
            let body = format!("{name}\n");
            let _ = write!(
                writer,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Client: {client}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}
