//! The container image (`deploy/Dockerfile`, its `.dockerignore`): the binary it builds, the
//! user it runs as, and the configuration it bakes in against the ports and folders it sets up.

use std::collections::BTreeSet;
use std::path::Path;

use datafold_gateway::config::Config;

use super::parse::{
    self, docker_context_admits, docker_copy, docker_words, final_stage, Instruction,
};
use super::{key_file, parent, parse_config, read_deploy_file, read_repo_file, CONFIG_PATH};

const DOCKERFILE: &str = "Dockerfile";

fn dockerfile() -> Vec<Instruction> {
    parse::dockerfile(&read_deploy_file(DOCKERFILE))
}

/// The user the final stage runs as, numerically.
fn docker_user(stage: &[&Instruction]) -> u32 {
    let user = stage
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .expect("the final stage sets USER");
    let uid = user.args.split(':').next().unwrap();
    uid.parse()
        .unwrap_or_else(|_| panic!("USER {uid}: use a numeric id so runAsNonRoot can verify it"))
}

/// The configuration the final stage copies to CONFIG_PATH, from the build context.
fn baked_config() -> (String, Config) {
    let instructions = dockerfile();
    let source = final_stage(&instructions)
        .into_iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| docker_copy(&i.args))
        .find(|(flags, _, dest)| {
            dest == CONFIG_PATH && flags.iter().all(|f| !f.starts_with("--from"))
        })
        .map(|(_, sources, _)| sources.into_iter().next().unwrap())
        .unwrap_or_else(|| panic!("the final stage copies no configuration to {CONFIG_PATH}"));
    let config = parse_config(&source, &read_repo_file(&source));
    (source, config)
}

#[test]
fn dockerfile_builds_a_locked_release_binary() {
    let instructions = dockerfile();
    let first = instructions.first().unwrap();
    assert!(
        first.args.starts_with("rust:"),
        "build stage FROM {}",
        first.args
    );
    assert!(instructions
        .iter()
        .filter(|i| i.stage == 0 && i.keyword == "RUN")
        .any(|i| i.args.contains("cargo build --release --locked")));
}

#[test]
fn dockerfile_final_stage_is_distroless_and_runs_as_a_numeric_non_root_user() {
    let instructions = dockerfile();
    let stage = final_stage(&instructions);
    assert!(
        stage[0].args.starts_with("gcr.io/distroless/"),
        "final FROM {}",
        stage[0].args
    );
    assert_ne!(docker_user(&stage), 0, "USER root");
}

#[test]
fn dockerfile_starts_the_gateway_with_the_config_it_bakes_in() {
    let (source, config) = baked_config();
    key_file(&config, &source);
    let instructions = dockerfile();
    let stage = final_stage(&instructions);
    let mut named = 0;
    for env in stage.iter().filter(|i| i.keyword == "ENV") {
        if let Some(value) = env.args.strip_prefix("DATAFOLD_GATEWAY_CONFIG=") {
            assert_eq!(value, CONFIG_PATH, "ENV DATAFOLD_GATEWAY_CONFIG");
            named += 1;
        }
    }
    for start in stage
        .iter()
        .filter(|i| i.keyword == "CMD" || i.keyword == "ENTRYPOINT")
    {
        let words = docker_words(&start.args);
        if let Some(i) = words.iter().position(|w| w == "--config") {
            assert_eq!(words[i + 1], CONFIG_PATH, "{} --config", start.keyword);
            named += 1;
        }
    }
    assert!(
        named > 0,
        "neither ENV nor CMD/ENTRYPOINT names {CONFIG_PATH}"
    );
}

#[test]
fn dockerfile_exposes_the_listen_and_admin_ports_of_its_config() {
    let (_, config) = baked_config();
    let instructions = dockerfile();
    let exposed: BTreeSet<u16> = final_stage(&instructions)
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    for (key, addr) in [("listen", config.listen.addr), ("admin", config.admin.addr)] {
        assert!(
            exposed.contains(&addr.port()),
            "{key}.addr {addr} not exposed"
        );
        assert!(
            addr.ip().is_unspecified(),
            "{key}.addr {addr}: a container's loopback is unreachable from outside it"
        );
    }
}

#[test]
fn dockerfile_gives_the_runtime_user_its_audit_folder() {
    let (_, config) = baked_config();
    let folder = parent(&config.audit.file);
    assert!(
        folder.is_absolute(),
        "audit.file {}",
        config.audit.file.display()
    );
    let instructions = dockerfile();
    let stage = final_stage(&instructions);
    let uid = docker_user(&stage);
    let owned = stage
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| docker_copy(&i.args))
        .any(|(flags, _, dest)| {
            Path::new(&dest) == folder
                && flags
                    .iter()
                    .any(|f| f.starts_with(&format!("--chown={uid}")))
        });
    assert!(
        owned,
        "the final stage creates no {} owned by {uid}",
        folder.display()
    );
}

#[test]
fn dockerfile_context_filter_admits_what_cargo_needs_and_keeps_target_out() {
    let ignore = read_deploy_file("Dockerfile.dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let (config_source, _) = baked_config();
    let mut needed = vec![
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        "src/main.rs".to_owned(),
        "src/lib.rs".to_owned(),
        config_source,
    ];
    // Targets declared in Cargo.toml must exist for cargo to read the manifest at all.
    let manifest: toml::Table = read_repo_file("Cargo.toml").parse().unwrap();
    for (section, folder) in [
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        let targets = manifest.get(section).and_then(|t| t.as_array());
        for target in targets.into_iter().flatten() {
            let path = match target.get("path").and_then(|p| p.as_str()) {
                Some(path) => path.to_owned(),
                None => format!("{folder}/{}.rs", target["name"].as_str().unwrap()),
            };
            needed.push(path);
        }
    }
    for path in &needed {
        assert!(
            docker_context_admits(&patterns, path),
            "Dockerfile.dockerignore keeps out {path}"
        );
    }
    for path in [
        "target/release/datafold-gateway",
        ".git/HEAD",
        "audit.jsonl",
    ] {
        assert!(
            !docker_context_admits(&patterns, path),
            "Dockerfile.dockerignore lets in {path}"
        );
    }
}
