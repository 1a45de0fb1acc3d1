//! The config loader: any text gives a config or one error line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wavelog_worker::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match Config::from_toml(text, &|_| None) {
            Ok(config) => {
                // The effective config it prints is itself valid.
                let printed = config.to_toml_redacted().replace(
                    "\"[redacted]\"",
                    "\"0123456789abcdef0123456789abcdef\"",
                );
                assert!(Config::from_toml(&printed, &|_| None).is_ok(), "{printed}");
            }
            Err(e) => assert!(!e.to_string().contains('\n'), "one line: {e}"),
        }
    }
});
