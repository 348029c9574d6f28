"""The admin's setup tools: reply-code catalogue, explain, SPF, advisor, doctor.

::

    catalogue.py      classify(reply) / is_transient(reply) / summary(reply): the one reply-code decision
    explain.py        relay365 explain CODE_OR_TEXT
    spf.py            the recommended SPF record, merge with DNS, pyspf evaluation on a given resolver
    advisor.py        the seed article's comparison as a decision (advisor_output.py: settings, TOML, DNS)
    dnsserver.py      a loopback authoritative DNS server (UDP+TCP) for tests and offline checks
    checks/           doctor checks returning CheckResult: dns, spf_check, network, tls, smtp,
                      relaycfg (config, listener certs, spool, queue), auth (token, XOAUTH2, Graph)
    doctor.py         run_doctor(DoctorOptions): checks given by flags; the rich table
    doctor_config.py  run_config_doctor(ConfigDoctorOptions): checks derived from a relay365.toml
    sendcheck.py      --send-test: a tracked message through the relay, found in the sandbox
    cli.py            register(app): explain, spf, advise, doctor
"""
