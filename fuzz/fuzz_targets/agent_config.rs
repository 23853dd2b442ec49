//! The agent's YAML configuration file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use strait::config::AgentConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = AgentConfig::parse(Path::new("fuzz.yaml"), text) {
        // Accepted means every derived setting is usable.
        config
            .local_source()
            .expect("an accepted config has a local source");
        let _ = config.node_name();
    }
});
