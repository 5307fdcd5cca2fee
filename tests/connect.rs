//! Connecting by URL: bad input fails at `connect` with a typed error that names the problem.

use spindle::Error;

async fn connect_err(url: &str) -> Error {
    match spindle::connect(url).await {
        Ok(b) => panic!("{url}: expected an error, connected to {}", b.name()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn memory_url_connects() {
    let broker = spindle::connect("memory://").await.unwrap();
    assert_eq!(broker.name(), "memory");
    let broker = spindle::connect("memory://?max_payload_bytes=1024&tick_ms=5")
        .await
        .unwrap();
    assert_eq!(broker.capabilities().max_payload_bytes, 1024);
}

#[tokio::test]
async fn malformed_url_is_invalid_config() {
    for url in ["", "memory", "::", "not a url at all"] {
        let err = connect_err(url).await;
        assert!(matches!(err, Error::InvalidConfig(_)), "{url}: {err:?}");
        assert!(err.to_string().contains("malformed URL"), "{url}: {err}");
    }
}

#[tokio::test]
async fn unknown_scheme_lists_enabled_schemes() {
    let err = connect_err("carrier-pigeon://coop").await;
    match &err {
        Error::UnknownScheme { scheme, enabled } => {
            assert_eq!(scheme, "carrier-pigeon");
            assert!(enabled.contains(&"memory"), "{enabled:?}");
        }
        other => panic!("expected UnknownScheme, got {other:?}"),
    }
    assert!(err.to_string().contains("memory"), "{err}");
}

#[tokio::test]
async fn unknown_option_names_the_option() {
    let err = connect_err("memory://?max_payload_byte=10").await;
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("max_payload_byte"), "{text}");
    assert!(
        text.contains("max_payload_bytes"),
        "lists the known ones: {text}"
    );
}

#[tokio::test]
async fn bad_option_value_names_the_option() {
    let err = connect_err("memory://?tick_ms=soon").await;
    assert!(err.to_string().contains("tick_ms"), "{err}");
}

#[tokio::test]
async fn memory_url_rejects_host_and_path() {
    let err = connect_err("memory://somewhere/else").await;
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
}

#[tokio::test]
async fn errors_never_show_credentials() {
    for url in [
        "amqp://app:hunter2@[::1",
        "carrier-pigeon://app:hunter2@coop",
        "memory://app:hunter2@host",
    ] {
        let err = connect_err(url).await;
        assert!(!err.to_string().contains("hunter2"), "{url}: {err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{url}: {err:?}");
    }
}

#[tokio::test]
async fn config_file_picks_the_backend() {
    let config =
        spindle::Config::from_toml("url = \"memory://\"\n[options]\ntick_ms = 5\n").unwrap();
    let broker = spindle::connect_with(config).await.unwrap();
    assert_eq!(broker.name(), "memory");
}

#[tokio::test]
async fn a_scheme_whose_feature_is_off_names_the_feature() {
    let enabled = spindle::enabled_schemes();
    let disabled = [("amqp", "rabbitmq"), ("kafka", "kafka"), ("sqs", "sqs")]
        .into_iter()
        .find(|(scheme, _)| !enabled.contains(scheme));
    match disabled {
        Some((scheme, feature)) => {
            let err = connect_err(&format!("{scheme}://127.0.0.1:1")).await;
            assert!(
                matches!(&err, Error::FeatureDisabled { feature: f, .. } if *f == feature),
                "{err:?}"
            );
            assert!(
                err.to_string().contains(&format!("`{feature}` feature")),
                "{err}"
            );
        }
        // Every backend is compiled in: then every scheme is listed as enabled.
        None => assert!(["memory", "amqp", "amqps", "kafka", "sqs"]
            .iter()
            .all(|s| enabled.contains(s))),
    }
}
