"""The command-line and INI contract."""

import os
import time
from pathlib import Path

import pytest

from mailerd import config, host, names
from mailerd.config import ConfigError, ListenAddress
from mailerd.delivery.secrets import Secrets


def load(*argv):
    return config.load(["-l", "127.0.0.1", "-n", "none", *argv])


def test_defaults():
    cfg = config.load(["-n", "none"])
    assert (
        cfg.spool.as_posix() == "/var/spool/mail" and cfg.queue.as_posix() == "/var/spool/mailerd"
    )
    assert "localhost" in cfg.domains
    assert ListenAddress("127.0.0.1", 25, config.LOCAL) in cfg.listeners
    assert cfg.max_message_size == 26214400 and cfg.timeout == 300 and cfg.max_errors == 20


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.2.3.4", ("1.2.3.4", 25)),
        ("::1", ("::1", 25)),
        ("[::1]:2525", ("::1", 2525)),
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[2001:db8::1]", ("2001:db8::1", 25)),
    ],
)
def test_addresses(text, expected):
    assert config.parse_address("listen-local", text, 25) == expected


def test_listener_roles_come_from_the_option():
    cfg = config.load(["-p", "2525", "-l", "127.0.0.1", "-n", "127.0.0.1:2526", "-n", "::1"])
    assert cfg.listeners == (
        ListenAddress("127.0.0.1", 2525, config.LOCAL),
        ListenAddress("127.0.0.1", 2526, config.NETWORK),
        ListenAddress("::1", 2525, config.NETWORK),
    )


@pytest.mark.parametrize("option", ["-l", "--listen-submission", "--listen-submissions"])
def test_an_ipv4_address_in_ipv6_form_is_no_listener(option):
    """mailerd's IPv6 sockets take IPv6 only: `[::ffff:192.0.2.25]` failed at its bind, after
    the start had begun; now the configuration says so, and which address to give."""
    with pytest.raises(ConfigError, match=r"IPv4 address in IPv6 form.*give 192\.0\.2\.25$"):
        load(option, "[::ffff:192.0.2.25]:2525")


def test_repeatable_domains_and_durations():
    cfg = load("-d", "Example.org", "--domain", "example.net", "--timeout", "30s")
    assert cfg.domains == ("example.org", "example.net", "localhost") and cfg.timeout == 30
    assert config.parse_duration("timeout", "5m") == 300
    assert config.parse_duration("timeout", "1h") == 3600


def test_max_recipients_per_day():
    """1000 by default (mox's), 0 for no limit, never negative."""
    assert load().max_recipients_per_day == 1000
    assert load("--max-recipients-per-day", "0").max_recipients_per_day == 0
    assert load("--max-recipients-per-day", "3").max_recipients_per_day == 3
    with pytest.raises(ConfigError, match="max-recipients-per-day"):
        load("--max-recipients-per-day", "-1")


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--bogus"], "--bogus"),
        (["-w", "x"], "workers"),
        (["--timeout", "5parsecs"], "timeout"),
        (["-l", "1.2.3.999"], "listen-local"),
        (["-p", "70000"], "port"),
        (["-d", "bad domain"], "domain"),
    ],
)
def test_bad_values_name_the_option(argv, names):
    with pytest.raises(ConfigError) as info:
        config.load(argv)
    assert names in str(info.value)
    assert "\n" not in str(info.value)


def test_ini_file_and_command_line_override(tmp_path):
    ini = tmp_path / "mailerd.conf"
    ini.write_text(
        "[mailerd]\nspool = /srv/mail\ndomain = a.example, b.example c.example\n"
        "listen-local = 127.0.0.1:2600, [::1]:2600\nlisten-network = none\nworkers = 3\n"
    )
    cfg = config.load(["-c", str(ini)])
    assert cfg.spool.as_posix() == "/srv/mail" and cfg.workers == 3
    assert cfg.domains == ("a.example", "b.example", "c.example", "localhost")
    assert len(cfg.listeners) == 2
    cfg = config.load(["-c", str(ini), "-w", "1", "-d", "z.example"])
    assert cfg.workers == 1 and cfg.domains == ("z.example", "localhost")


def test_ini_errors(tmp_path):
    ini = tmp_path / "bad.conf"
    ini.write_text("[mailerd]\nworkers = many\n")
    with pytest.raises(ConfigError, match="workers"):
        config.load(["-c", str(ini)])
    ini.write_text("[mailerd]\ncolour = blue\n")
    with pytest.raises(ConfigError, match="colour"):
        config.load(["-c", str(ini)])
    with pytest.raises(ConfigError, match="missing.conf") as info:
        config.load(["-c", str(tmp_path / "missing.conf")])
    # The system's words, once, not Python's "[Errno 2] No such file or directory: '...'"
    assert str(info.value) == f"config file {tmp_path / 'missing.conf'}: No such file or directory"
    ini.write_bytes(b"[mailerd]\nhostname = caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        config.load(["-c", str(ini)])
    assert str(info.value) == f"config file {ini}: not UTF-8 text"


@pytest.mark.parametrize(
    "key, value",
    [
        ("workers", "many"),
        ("max-message-size", "lots"),
        ("listen-local", "1.2.3.999"),
        ("inbound-auth", "strict"),
        ("timeout", "5parsecs"),
        ("verbose", "maybe"),
    ],
)
def test_a_bad_value_from_the_file_is_named_as_its_key_there(tmp_path, key, value):
    """Not as the option (an operator who wrote 'workers = many' has no '--workers' to find),
    unless the command line gave it."""
    ini = tmp_path / "mailerd.conf"
    ini.write_text(f"[mailerd]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        config.load(["-c", str(ini)])
    assert str(info.value).startswith(f"config file {ini}: {key}: "), str(info.value)
    assert value in str(info.value)
    if key == "verbose":
        return  # (a flag: the command line gives it no value)
    with pytest.raises(ConfigError) as info:
        config.load(["-c", str(ini), f"--{key}", "bad value"])
    assert str(info.value).startswith(f"--{key}: "), str(info.value)


def test_ini_inline_comments(tmp_path):
    """A " # ..." or " ; ..." after a value is a comment, as the README writes them, in the
    daemon's reader and in the commands' (passwd, newaliases, sendmail -C use read_ini)."""
    from mailerd.commands import daemon, sendmail

    ini = tmp_path / "mailerd.conf"
    ini.write_text(
        "[mailerd]\n"
        "queue = /tmp/q   # queue dir\n"
        "listen-local = 127.0.0.1:2600, [::1]:2600   # port 2600\n"
        "listen-network = none ; none\n"
        "domain = a.example, b.example\t# two\n"
        "verbose = yes # loud\n"
        "max-message-size = 1000 ; small\n"
    )
    cfg = config.load(["-c", str(ini)])
    assert cfg.queue.as_posix() == "/tmp/q" and cfg.verbose
    assert cfg.domains == ("a.example", "b.example", "localhost") and len(cfg.listeners) == 2
    assert daemon.read_config(str(ini))["queue"] == "/tmp/q"
    settings = sendmail.load_settings(str(ini))
    assert settings.queue == "/tmp/q" and settings.max_message_size == 1000
    # a '#' or ';' without whitespace before it stays in the value (and fails as one)
    ini.write_text("[mailerd]\nworkers = 3#x\n")
    with pytest.raises(ConfigError, match="workers"):
        config.load(["-c", str(ini)])


def test_relay_auth_needs_a_relayhost(tmp_path):
    """The smarthost's credentials without a smarthost would go to every domain's MX (an
    attacker's MX was handed the password): refused, at start-up and so at a reload, from the
    command line or the file, naming both options."""
    auth = tmp_path / "relay-auth"
    auth.write_text("user:secret\n")
    auth.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load("--relay-auth", str(auth))
    message = str(info.value)
    assert message.startswith("relay-auth: needs --relayhost") and "\n" not in message
    ini = tmp_path / "mailerd.conf"
    ini.write_text(f"[mailerd]\nrelay-auth = {auth}\nrelayhost =\n")
    with pytest.raises(ConfigError, match="relay-auth: needs --relayhost"):
        load("-c", str(ini))
    # with a relayhost, from either place, the credentials are read (by the delivery process)
    cfg = load("-c", str(ini), "--relayhost", "smtp.example.net:587")
    assert cfg.relayhost == ("smtp.example.net", 587)
    assert Secrets.load(cfg).relay_login == ("user", "secret")
    assert Secrets.load(load("--relayhost", "smtp.example.net")).relay_login is None


def test_the_example_config_loads():
    """etc/mailerd.conf as installed is a valid config file."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "etc" / "mailerd.conf"
    cfg = config.load(["-c", str(example), "-l", "127.0.0.1", "-n", "none"])
    assert cfg.queue.as_posix() == config.DEFAULT_QUEUE


def test_identity_follows_debian(tmp_path, monkeypatch):
    """Without -d/-H: /etc/mailname is the first local domain, then the FQDN, then localhost;
    the host name is the FQDN, or the mail name when the FQDN has no dot."""
    mailname = tmp_path / "mailname"
    mailname.write_text("Mail.Example.ORG.\n")
    monkeypatch.setattr(host, "MAILNAME", str(mailname))
    monkeypatch.setattr(host, "local_fqdn", lambda: "host.example.net")
    cfg = load()
    assert cfg.domains == ("mail.example.org", "host.example.net", "localhost")
    assert cfg.hostname == "host.example.net"
    monkeypatch.setattr(host, "local_fqdn", lambda: "host")
    assert load().hostname == "mail.example.org"
    assert load().domains == ("mail.example.org", "host", "localhost")
    mailname.write_text("not a domain!\n")
    assert load().domains == ("host", "localhost") and load().hostname == "host"
    mailname.unlink()
    monkeypatch.setattr(host, "local_fqdn", lambda: "host.example.net")
    assert load().domains == ("host.example.net", "localhost")
    assert load("-d", "given.example").domains == ("given.example", "localhost")


def test_the_fqdn_comes_from_etc_hosts_never_from_dns(tmp_path, monkeypatch):
    """The default FQDN is the kernel's host name when it has a dot, else the first dotted
    name (localhost's excepted) of the /etc/hosts line that lists it, else the bare name:
    socket.getfqdn(), which asks the resolver, is never called."""

    def no_resolver(*args):
        raise AssertionError("the resolver was asked")

    monkeypatch.setattr(host.socket, "getfqdn", no_resolver)
    monkeypatch.setattr(host.socket, "gethostbyaddr", no_resolver)
    monkeypatch.setattr(host.socket, "getaddrinfo", no_resolver)
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1\tlocalhost.localdomain localhost mx  # not this line\n"
        "# 127.0.1.1 mx.commented.example mx\n"
        "127.0.1.1\tMX mx.Example.ORG. mx.second.example\n"
    )
    monkeypatch.setattr(host, "HOSTS", str(hosts))
    monkeypatch.setattr(host.socket, "gethostname", lambda: "mx")
    assert host.local_fqdn() == "mx.example.org"
    monkeypatch.setattr(host.socket, "gethostname", lambda: "Box.Example.NET")
    assert host.local_fqdn() == "box.example.net"
    monkeypatch.setattr(host.socket, "gethostname", lambda: "other")
    assert host.local_fqdn() == "other"
    hosts.unlink()
    monkeypatch.setattr(host.socket, "gethostname", lambda: "mx")
    assert host.local_fqdn() == "mx"


def test_the_example_config_documents_every_option():
    """etc/mailerd.conf (installed as /etc/mailerd/mailerd.conf) names every option a config
    file may hold, and nothing else (a misspelt key would be a start-up error)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "etc" / "mailerd.conf").read_text()
    named = {
        line.lstrip("#").split("=")[0].strip()
        for line in text.splitlines()
        if " = " in line and not line.startswith("# ")
    }
    options = {name for name, *_ in config.OPTIONS}
    assert options - {"config", "foreground"} - named == set()
    assert named - options == set()


def test_a_config_file_that_is_no_regular_file_is_refused_at_once(tmp_path: Path):
    """The master reads the file at every reload: a FIFO in its place blocked it there (no
    reaping, no SIGTERM), /dev/zero would have filled its memory (an attacker's pass)."""
    fifo = tmp_path / "mailerd.conf"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.read_ini(str(fifo))
    assert time.monotonic() - started < 1
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.read_ini("/dev/zero")
    big = tmp_path / "big.conf"
    big.write_text("[mailerd]\n" + "# x\n" * (config.MAX_CONFIG_SIZE // 4 + 1))
    with pytest.raises(config.ConfigError, match="over"):
        config.read_ini(str(big))


def test_public_address_takes_only_addresses_the_world_can_reach():
    cfg = config.load(["-d", "example.org", "-H", "mx.example.org", "--public-address",
                       "203.0.113.9", "--public-address", "[2001:db8::9]"])  # fmt: skip
    assert cfg.public_addresses == ("203.0.113.9", "2001:db8::9")
    for bad in ("10.0.0.5", "192.168.1.2", "100.64.0.1", "fd00::1", "127.0.0.1", "0.0.0.0",
                "fe80::1", "mx.example.org", "::ffff:10.0.0.1", "::ffff:203.0.113.9",
                "::10.0.0.1", "64:ff9b::10.0.0.1", "2002:a00:1::1", "::ffff:0:10.0.0.1",
                "2001:0:4136:e378:8000:63bf:3fff:fdd2"):  # fmt: skip
        with pytest.raises(config.ConfigError, match="public-address"):
            config.load(["-d", "example.org", "-H", "mx.example.org", "--public-address", bad])


def test_a_wildcard_listener_stands_for_the_machines_public_addresses(monkeypatch):
    """`mailerd dns`: 0.0.0.0 and :: are the machine's addresses of their family, but for the
    private ones (a container bridge's, a VPN's, a unique local IPv6 address), which the world
    reaches none of (it asked for an AAAA of fd00::2: an attacker's pass); behind a NAT,
    public-address."""
    from mailerd.commands import dnsrecords

    monkeypatch.setattr(
        host,
        "machine_addresses",
        lambda: ["127.0.0.1", "203.0.113.9", "172.17.0.1", "::1", "2001:db8::9", "fd00::2"],
    )
    cfg = config.load(["-d", "example.org", "-H", "mx.example.org", "-n", "0.0.0.0", "-n", "::"])
    assert dnsrecords.listener_addresses(cfg) == ["203.0.113.9", "2001:db8::9"]
    notes = list(dnsrecords.notes(cfg, ["203.0.113.9", "2001:db8::9"], []))
    assert any("172.17.0.1" in n for n in notes) and any("fd00::2" in n for n in notes), notes
    monkeypatch.setattr(host, "machine_addresses", lambda: ["10.0.0.5", "fd00::2"])
    cfg = config.load(["-d", "example.org", "-H", "mx.example.org", "-n", "0.0.0.0", "-n", "::",
                       "--public-address", "203.0.113.7"])  # fmt: skip
    assert dnsrecords.listener_addresses(cfg) == ["203.0.113.7"]


def test_the_submission_listeners_an_srv_record_names(monkeypatch):
    """`mailerd dns`: a mail program sent to the host name reaches a submission listener on one
    of its A/AAAA addresses, or on the wildcard of that family, or, behind a 1:1 NAT, on the
    private address public-address stands for (so 0.0.0.0, as the README has it, at a cloud
    provider); not one on loopback, nor one of a family the A/AAAA do not have."""
    from mailerd.commands import dnsrecords

    monkeypatch.setattr(host, "machine_addresses", lambda: ["10.0.0.5", "fd00::2"])
    cfg = config.load(["-d", "example.org", "-H", "mx.example.org", "-n", "10.0.0.5",
                       "--public-address", "203.0.113.7", "--tls-cert", "c", "--tls-key", "k",
                       "--listen-submissions", "0.0.0.0", "--listen-submission", "10.0.0.5",
                       "--listen-submission", "127.0.0.1:2587",
                       "--listen-submission", "[::]"])  # fmt: skip
    addresses = dnsrecords.listener_addresses(cfg)
    assert addresses == ["203.0.113.7"]
    found = [str(a) for a in dnsrecords.submission_listeners(cfg, addresses)]
    assert found == ["10.0.0.5:587", "0.0.0.0:465"]


def test_behind_a_nat_only_the_network_listeners_private_address_gets_srv_records(monkeypatch):
    """`mailerd dns`: public-address stands for the private addresses the network listeners
    are on (what the 1:1 NAT forwards to), not for any private address: submission listeners
    on another one (a second interface, a container bridge) are not reached at the host name
    (an attacker's pass: both got SRV records)."""
    from mailerd.commands import dnsrecords

    monkeypatch.setattr(host, "machine_addresses", lambda: ["10.0.0.5", "10.0.0.9", "172.17.0.1"])
    cfg = config.load(["-d", "example.org", "-H", "mx.example.org", "-n", "10.0.0.5:25",
                       "--public-address", "203.0.113.5", "--tls-cert", "c", "--tls-key", "k",
                       "--listen-submission", "10.0.0.9:587",
                       "--listen-submissions", "172.17.0.1:465",
                       "--listen-submissions", "10.0.0.5:465"])  # fmt: skip
    addresses = dnsrecords.listener_addresses(cfg)
    assert addresses == ["203.0.113.5"]
    found = [str(a) for a in dnsrecords.submission_listeners(cfg, addresses)]
    assert found == ["10.0.0.5:465"]


def test_unreadable_interface_addresses_are_a_config_error(monkeypatch):
    """The default network listener's addresses come from netlink (psutil); where sockets of
    that family are refused (a sandbox: systemd's RestrictAddressFamilies= without AF_NETLINK)
    mailerd said so with a traceback. Now a message naming the way out, at start and reload."""
    import psutil

    def refused() -> dict:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(psutil, "net_if_addrs", refused)
    with pytest.raises(ConfigError, match="listen-network: cannot read the addresses of"):
        config.load(["-i", "eth0", "-d", "example.org"])
    named = config.load(["-n", "192.0.2.1", "-d", "example.org"])
    assert [a.host for a in named.listeners if a.role == config.NETWORK] == ["192.0.2.1"]


def test_own_addresses_are_read_with_the_files(tmp_path, monkeypatch):
    """The master reads the machine's addresses with the files it reads before it forks:
    the listeners' (not a wildcard itself), the loopback's, the public ones of a 1:1 NAT, the
    default route's interface's; written as ipaddress writes them, IPv4 as IPv4."""
    monkeypatch.setattr(host, "default_interface", lambda: "eth9")
    seen = []

    def addresses(iface: str) -> list[str]:
        seen.append(iface)
        return ["10.0.0.5", "2001:db8::5"]

    monkeypatch.setattr(host, "interface_addresses", addresses)
    (tmp_path / "aliases").write_text("")
    argv = ["-l", "127.0.0.1", "-n", "[2001:DB8:0::25]", "--public-address", "203.0.113.5"]
    argv += ["--aliases", str(tmp_path / "aliases"), "--passwd", str(tmp_path / "passwd")]
    argv += ["-d", "ex.org"]
    cfg = config.load(argv)
    assert cfg.own_addresses == frozenset()  # (not a file the configuration names)
    loaded = config.load_files(cfg)
    own = loaded.own_addresses
    expected = {"127.0.0.1", "2001:db8::25", "203.0.113.5", "10.0.0.5", "2001:db8::5"}
    assert own - {"::1"} == expected and seen == ["eth9"]
    # (what every part asks "is this ours?" of: the domains and the addresses as read)
    assert loaded.locality == names.Locality(cfg.domains, own)
    assert loaded.locality.is_local("[10.0.0.5]") and not cfg.locality.is_local("[10.0.0.5]")
    assert host.own_addresses(["::ffff:198.51.100.1", "0.0.0.0"]) >= {"198.51.100.1"}
    assert "0.0.0.0" not in host.own_addresses(["0.0.0.0"])


def test_own_addresses_without_netlink_are_the_named_ones(monkeypatch):
    """Where the interfaces cannot be read (netlink refused: a sandbox), the way out the
    default listener's error names, listeners given by address, must not fail in turn."""
    import psutil

    def refused() -> dict:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(psutil, "net_if_addrs", refused)
    monkeypatch.setattr(host, "default_interface", lambda: "eth0")
    assert host.own_addresses(["192.0.2.1"], ["203.0.113.5"]) - {"::1"} == {
        "192.0.2.1",
        "203.0.113.5",
        "127.0.0.1",
    }
    assert host.own_addresses(["0.0.0.0"]) - {"::1"} == {"127.0.0.1"}


def test_an_alias_target_at_an_address_literal_of_ours_is_local(tmp_path, monkeypatch):
    """`root: admin@[127.0.0.1]` delivers to admin, as Postfix does and as mail to
    admin@[127.0.0.1] does everywhere else (policy.route): read as a forward, the copy looped
    back to us and bounced (network mail: dropped, as forwarded mail SPF did not verify). A
    name that lists itself at a literal is its own mailbox; another machine's is forwarded."""
    from mailerd.aliases import Expansion

    monkeypatch.setattr(host, "default_interface", lambda: None)
    (tmp_path / "aliases").write_text(
        "root: admin@[127.0.0.1], bob@[IPv6:::1]\n"
        "public: carol@[203.0.113.5]\n"
        "self: self@[127.0.0.1]\n"
        "far: dave@[192.0.2.99]\n"
    )
    argv = ["-l", "127.0.0.1", "-n", "none", "--public-address", "203.0.113.5", "-d", "ex.org"]
    argv += ["--aliases", str(tmp_path / "aliases"), "--passwd", str(tmp_path / "passwd")]
    table = config.load_files(config.load(argv)).aliases
    assert table.lookup("root") == Expansion(mailboxes=("admin", "bob"))
    assert table.lookup("public") == Expansion(mailboxes=("carol",))
    assert table.lookup("self") == Expansion(mailboxes=("self",))
    assert table.lookup("far") == Expansion(forwards=("dave@[192.0.2.99]",))
