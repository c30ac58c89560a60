//! `keel-cni`: a CNI plugin (spec 1.0, with 1.1's STATUS and GC), run by a container runtime
//! with the `CNI_*` variables and the network configuration on stdin. Prints the result (ADD),
//! the versions (VERSION) or the spec's error object, and exits non-zero on error.

use std::io::{Read, Write};

use node_agent_cni::{
    plugin::{self, Output},
    spec::{self, Invocation},
};

fn main() -> std::process::ExitCode {
    let outcome = Invocation::from_env(|name| std::env::var(name).ok()).and_then(|invocation| {
        let mut stdin = Vec::new();
        if invocation.command != spec::Command::Version {
            std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
                spec::Error::new(spec::code::IO, "reading the network configuration failed")
                    .with_details(e.to_string())
            })?;
        }
        plugin::run(&invocation, &stdin)
    });
    let mut stdout = std::io::stdout().lock();
    let (text, code) = match outcome {
        Ok(Output::Result(result)) => (serde_json::to_string(&result), 0),
        Ok(Output::Version(version)) => (serde_json::to_string(&version), 0),
        Ok(Output::Nothing) => return std::process::ExitCode::SUCCESS,
        Err(error) => (serde_json::to_string(&error), 1),
    };
    let _ = writeln!(stdout, "{}", text.unwrap_or_default());
    std::process::ExitCode::from(code)
}
