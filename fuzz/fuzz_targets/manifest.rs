//! Manifest text → parser and planner: an error or a plan, never a panic.
#![no_main]
use deeprepair_pipeline::manifest::Source;
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::OnceLock;

fn registry() -> &'static deeprepair_pipeline::Registry {
    static REGISTRY: OnceLock<deeprepair_pipeline::Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut r = deeprepair_pipeline::Registry::new();
        deeprepair_pipeline::builtin::register(&mut r);
        deeprepair_stages::register(&mut r);
        r
    })
}

fuzz_target!(|text: &str| {
    let source = Source {
        path: "fuzz.yaml".into(),
        text: text.to_string(),
    };
    let _ = deeprepair_pipeline::plan::plan_source(&source, registry(), &BTreeMap::new());
});
