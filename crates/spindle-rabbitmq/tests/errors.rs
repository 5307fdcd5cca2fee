//! Typed errors, quickly: wrong credentials, a missing vhost, unknown options; and no
//! credentials in any of them.

mod common;

use std::time::{Duration, Instant};

use spindle_core::{Config, Error};

fn with_userinfo(user: &str, password: &str, vhost: &str) -> String {
    format!("amqp://{user}:{password}@{}/{vhost}", common::ADDRESS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_an_authentication_error_within_10s() {
    if !common::broker_available("wrong_credentials").await {
        return;
    }
    let config = Config::parse(&with_userinfo("guest", "not-the-password-XYZZY", "%2f")).unwrap();
    let started = Instant::now();
    let err = spindle_rabbitmq::connect(&config)
        .await
        .expect_err("wrong password must fail");
    let took = started.elapsed();
    println!("wrong credentials: {err} (after {took:?})");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        matches!(err, Error::Authentication { .. }),
        "expected Authentication, got {err:?}"
    );
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("XYZZY"), "password leaked: {shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_is_an_authentication_error_within_10s() {
    if !common::broker_available("unknown_user").await {
        return;
    }
    let config = Config::parse(&with_userinfo("nobody-here", "pw-SECRET1", "%2f")).unwrap();
    let started = Instant::now();
    let err = spindle_rabbitmq::connect(&config)
        .await
        .expect_err("unknown user");
    let took = started.elapsed();
    println!("unknown user: {err} (after {took:?})");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(matches!(err, Error::Authentication { .. }), "{err:?}");
    assert!(!format!("{err:?}").contains("SECRET1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_vhost_is_not_found_naming_it_within_10s() {
    if !common::broker_available("missing_vhost").await {
        return;
    }
    let config = Config::parse(&with_userinfo("guest", "guest", "no-such-vhost-spindle")).unwrap();
    let started = Instant::now();
    let err = spindle_rabbitmq::connect(&config)
        .await
        .expect_err("missing vhost must fail");
    let took = started.elapsed();
    println!("missing vhost: {err} (after {took:?})");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        matches!(err, Error::NotFound { .. }),
        "expected NotFound, got {err:?}"
    );
    assert!(err.to_string().contains("no-such-vhost-spindle"), "{err}");
    assert!(!err.to_string().contains("guest:guest"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_a_connection_error_within_the_connect_timeout() {
    // A port nobody listens on: refused at once, or bounded by connect_timeout_ms.
    let config =
        Config::parse("amqp://guest:pw-SECRET2@127.0.0.1:1/%2f?connect_timeout_ms=2000").unwrap();
    let started = Instant::now();
    let err = spindle_rabbitmq::connect(&config)
        .await
        .expect_err("nothing listens");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(!format!("{err:?} {err}").contains("SECRET2"), "{err:?}");
}

#[tokio::test]
async fn unknown_options_and_schemes_are_rejected() {
    let err = spindle_rabbitmq::connect(&Config::parse("amqp://h/%2f?prefetchh=5").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains("prefetchh"), "{err}");
    let err = spindle_rabbitmq::connect(&Config::parse("kafka://h").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert_eq!(spindle_rabbitmq::SCHEMES, &["amqp", "amqps"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_of_a_broker_shows_no_credentials() {
    if !common::broker_available("debug_of_a_broker").await {
        return;
    }
    let broker = spindle_rabbitmq::connect(&Config::parse(&common::url()).unwrap())
        .await
        .unwrap();
    let shown = format!("{broker:?}");
    assert!(!shown.contains("guest:guest"), "{shown}");
    spindle_core::Broker::shutdown(&broker).await.unwrap();
}
