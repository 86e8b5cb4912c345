"""serving.auth: who may reach a gateway that has no API keys."""


def test_exposure_and_host_rules():
    from serving.auth import checked_hosts, exposure_problem, host_allowed, is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "app.localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.com", "localhost.evil.com"):
        assert not is_loopback(host), host
    assert "no API keys" in exposure_problem("0.0.0.0", False, False)
    assert exposure_problem("0.0.0.0", True, False) is None
    assert exposure_problem("0.0.0.0", False, True) is None
    assert exposure_problem("127.0.0.1", False, False) is None
    hosts = checked_hosts("127.0.0.1", False, ["Gateway.Internal"])
    assert hosts == {"gateway.internal"}
    assert checked_hosts("127.0.0.1", True, []) is None  # keys protect it
    assert checked_hosts("0.0.0.0", False, []) is None  # open on purpose
    for header in ("127.0.0.1:8000", "localhost", "[::1]:8000", "gateway.internal:80"):
        assert host_allowed(header, hosts), header
    for header in (None, "", "evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                   "[::2]:80"):
        assert not host_allowed(header, hosts), header
