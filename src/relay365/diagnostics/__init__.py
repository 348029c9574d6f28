"""The admin's setup tools: explain, SPF, advisor, doctor (the reply-code catalogue is core data:
:mod:`relay365.replies`).

::

    explain.py        relay365 explain CODE_OR_TEXT (relay365.replies.classify, rendered)
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
