#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

Run once when a target is added (`python3 fuzz/seeds/make_seeds.py`); libFuzzer adds what
it finds beside them and `cargo xtask fuzz --merge` keeps only inputs with new coverage.
Seeds are the shapes the agent reads on real hosts (fixtures, libvirt, kernel docs).
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def seeds(target, items):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    for name, data in items.items():
        if isinstance(data, str):
            data = data.encode()
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)


def argv(*args):
    return b"".join(a + b"\0" for a in args)


Q = b"/usr/bin/qemu-system-x86_64"
seeds("qemu_cmdline", {
    "libvirt": argv(Q, b"-name", b"guest=web-01,debug-threads=on", b"-S", b"-uuid",
                    b"6695EB01-F6A4-8304-79AA-97F2502E193F", b"-m", b"size=262144k",
                    b"-append", b"console=ttyS0 -name fake"),
    "odd-name": argv(b"qemu-kvm", b"--name", b"guest=a,,b,,,,c,debug-threads=on", b"-m", b"4G"),
    "implied": argv(b"qemu-system-aarch64", b"-name", b"implied,,comma,process=x", b"-uuid"),
    "not-qemu": argv(b"/bin/bash", b"-name", b"x"),
    "no-nul": b"qemu-system-x86_64\0-m\0512",
    "empty": b"",
})

seeds("proc_comm", {
    "kvm": "CPU 0/KVM", "tcg": "CPU 12/TCG", "io": "IO iothread0", "vhost": "vhost-1234",
    "qemu": "qemu-system-x86", "kvm-bin": "qemu-kvm", "path": "/usr/bin/qemu-system-x86_64",
    "kworker": "kworker/0:1H-kblockd", "cpu-bad": "CPU /KVM",
})

seeds("proc_pid_stat", {
    "kthreadd": "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0\n",
    "odd-comm": "90 (qemu (odd) name) S 1 90 90 0 -1 4194560 0 0\n",
    "spaces": "7 (a b) c) R 1 2 3 4 5 6 7 8 9\n",
    "short": "3 (x) S 1",
    "garbage": "garbage",
})

with open("/proc/self/status", "rb") as f:
    status = f.read()
seeds("proc_status", {
    "self": status,
    "root": "Name:\toptimus\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n"
            "CapEff:\t000001ffffffffff\n",
    "bpf-perfmon": "CapEff:\t000000c000000000\n",
})

T0 = ("cpu  4000 0 2000 34000 0 0 0 0 0 0\ncpu0 1000 0 500 8500 0 0 0 0 0 0\n"
      "cpu1 1000 0 500 8500 0 0 0 0 0 0\nintr 12345 0 0\nctxt 67890\n")
T1 = ("cpu  5550 100 2600 36750 50 100 100 200 100 0\ncpu0 1500 100 700 8500 0 100 100 0 0 0\n"
      "cpu1 1250 0 500 9200 50 0 0 0 0 0\nintr 23456 0 0\nctxt 78901\n")
seeds("proc_stat", {
    "two-readings": T0 + "\0" + T1,
    "hotplug": T0 + "\0" + "cpu0 1 2 3 4\ncpu7 9 9 9 9 9 9 9 9\n",
    "one": T0,
})

seeds("proc_cpuinfo", {
    "skylake": "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n"
               "model name\t: Intel(R) Xeon(R)\nstepping\t: 7\n\nprocessor\t: 1\n",
    "epyc": "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\n",
    "none": "processor : 0\n",
})

seeds("proc_mountinfo", {
    "v1": "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
          "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
          "35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,relatime shared:9 - cgroup cgroup rw,memory\n"
          "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
    "v2": "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
    "escaped": "36 31 0:33 /machine /mnt/with\\040space\\134x rw - cgroup cgroup rw,memory\n",
    "no-sep": "1 2 3:4 / / rw\n",
})

seeds("proc_pid_cgroup", {
    "v1-libvirt": "12:cpu,cpuacct:/machine/qemu-1-vm.libvirt-qemu/emulator\n"
                  "4:memory:/machine/qemu-1-vm.libvirt-qemu\n1:name=systemd:/\n0::/\n",
    "v2-libvirt": "0::/machine.slice/machine-qemu\\x2d1\\x2dvm.scope/libvirt/emulator\n",
    "escape": "4:memory:/machine/../../etc\n0::/../x\n",
    "root": "0::/\n",
})

def nul(*parts):
    return "\0".join(parts)

R = "4294967295"
seeds("powercap_sysfs", {
    "steady": nul("package-0", "core", R, "5000000", R, "1000",
                  *[str(5000000 + 1000000 * i) + "\0" + str(1000 + 500000 * i) for i in range(1, 9)]),
    "wrap": nul("package-0", "core", R, "4294000000", R, "4294960000", "1000", "5000", "2000000"),
    "eacces": nul("package-0", "core", R, "!EACCES", R, "100", "!EACCES", "200", "300"),
    "zero-range": nul("package-0", "dram", "0", "5", "x", "1"),
    "psys": nul("psys", "uncore", R + "\n", "1\n", R, "2", "3", "4"),
})

SCALE = "2.3283064365386962890625e-10"
seeds("perf_sysfs", {
    "intel": nul("33", "event=0x02", SCALE, "Joules", "event=0x03", SCALE, "Joules", "0,24"),
    "ranges": nul("33", "event=2", "1e-9", "Joules", "event=0x03", "0", "Watts", "0-3,8"),
    "missing": nul("!ENOENT"),
    "cpulist": "0-3,8,10-11",
})


def btf_blob(extra_struct=None):
    strings = b"\0int\0task_struct\0state\0pid\0tgid\0page\0flags\0compound_head\0memcg_data\0request\0q\0"

    def name(s):
        return strings.index(b"\0" + s.encode() + b"\0") + 1

    KIND_STRUCT, KIND_UNION, KIND_TYPEDEF = 4, 5, 8
    t = []
    push = t.append
    push(name("int")); push(1 << 24); push(4); push(32)
    push(name("task_struct")); push((KIND_STRUCT << 24) | 3); push(12)
    for m, off in (("state", 0), ("pid", 32), ("tgid", 64)):
        push(name(m)); push(1); push(off)
    push(0); push((KIND_STRUCT << 24) | 1); push(4)
    push(name("compound_head")); push(1); push(0)
    push(0); push((KIND_UNION << 24) | 1); push(4)
    push(0); push(3); push(0)
    push(0); push(KIND_TYPEDEF << 24); push(4)
    push(name("page")); push((KIND_STRUCT << 24) | 3); push(20)
    push(name("flags")); push(1); push(0)
    push(0); push(5); push(64)
    push(name("memcg_data")); push(1); push(128)
    if extra_struct:
        push(name("request")); push((KIND_STRUCT << 24) | (1 << 31) | 1); push(8)
        push(name("q")); push(1); push((3 << 24) | 5)
    types = b"".join(struct.pack("<I", v) for v in t)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


seeds("btf", {"tiny": btf_blob(), "bitfield": btf_blob(extra_struct=True), "magic-only": b"\x9f\xeb"})

seeds("carbon_json", {
    "uk": '{"data":[{"from":"2018-01-20T12:00Z","to":"2018-01-20T12:30Z",'
          '"intensity":{"forecast":266,"actual":263,"index":"moderate"}}]}',
    "uk-null": '{"data":[{"intensity":{"forecast":266,"actual":null}}]}',
    "em": '{"zone":"DE","carbonIntensity":302,"datetime":"2018-04-25T18:07:00.350Z",'
          '"isEstimated":false,"estimationMethod":null}',
    "em-other-zone": '{"zone":"FR","carbonIntensity":1e308}',
    "nested": "[" * 64 + "]" * 64,
})

seeds("cli_values", {
    "s": "1s", "ms": "250ms", "m": "2m", "bare": "0.5", "watts": "0.74,3.5",
    "huge": "1e400", "bad-watts": "3.5,nan",
})

seeds("carbon_forecast", {
    "uk-fw48h": '{"data":[{"from":"2026-12-01T12:30Z","to":"2026-12-01T13:00Z",'
                '"intensity":{"forecast":266,"index":"moderate"}},'
                '{"from":"2026-12-01T13:00Z","to":"2026-12-01T13:30Z","intensity":{"forecast":250}}]}',
    "em": '{"zone":"DE","forecast":[{"carbonIntensity":300,"datetime":"2026-12-01T13:00:00.000Z"},'
          '{"carbonIntensity":null,"datetime":"2026-12-01T14:00:00+01:00"},'
          '{"carbonIntensity":280,"datetime":"2026-12-01T15:00:00Z"}]}',
    "bad-time": '{"data":[{"from":"yesterday","to":"2026-12-01T13:00Z","intensity":{"forecast":1}}]}',
})

with open("/proc/meminfo", "rb") as f:
    meminfo = f.read()
seeds("proc_meminfo", {
    "real": meminfo,
    "huge": "MemTotal: 18446744073709551615 kB\nMemAvailable: 1 kB\n",
})

TLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "tls")


def pem(name):
    with open(os.path.join(TLS, name)) as f:
        return f.read()


def indent(text, n):
    return "".join(" " * n + line + "\n" for line in text.splitlines())


seeds("web_config", {
    "files": "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
             "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
             "  min_version: TLS12\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n"
             "  curve_preferences: [X25519, CurveP256]\n"
             "basic_auth_users:\n  prom: $2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG\n"
             "http_server_config:\n  http2: true\n  headers:\n    X-Frame-Options: deny\n",
    "inline": "tls_server_config:\n  cert: |\n" + indent(pem("server.crt"), 4)
              + "  key: |\n" + indent(pem("server.key"), 4),
    "empty": "",
    "unknown-key": "tls_server_config:\n  certfile: x\n",
    "anchors": "basic_auth_users: &a\n  u: *a\n",
})

seeds("http_request", {
    "scrape": b"\0GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\n"
              b"Accept-Encoding: gzip\r\n\r\n",
    "keepalive": b"\0GET / HTTP/1.1\r\nHost: x\r\n\r\nHEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    "post": b"\0POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    "bare-lf": b"\0GET /metrics HTTP/1.1\nHost: x\n\n",
    "junk": b"\0\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    "auth-ok": b"\1GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic cHJvbTpzM2NyZXQ=\r\n"
               b"Accept-Encoding: gzip;q=0, *\r\n\r\n",
    "auth-bad": b"\1GET /metrics HTTP/1.1\r\nAuthorization: Basic !!!!\r\n\r\n",
    "http10": b"\0GET /nope?x=1 HTTP/1.0\r\n\r\n",
})

seeds("libvirt_status", {
    "running": "<domstatus state='running' reason='booted' pid='25908'>\n"
               "  <taint flag='high-privileges'/>\n"
               "  <vcpus>\n    <vcpu id='0' pid='25914'/>\n    <vcpu id='1' pid='25915'/>\n  </vcpus>\n"
               "  <domain type='qemu' id='1'>\n    <name>web &quot;prod&quot; &amp; co</name>\n"
               "    <uuid>570E7A0B-8C3D-4F4A-9B5E-2D1C0F6A7B8C</uuid>\n    <memory unit='KiB'>262144</memory>\n"
               "  </domain>\n</domstatus>\n",
    "no-pid": "<domstatus state='shutoff'><domain><name>x</name><uuid>570e7a0b-8c3d-4f4a-9b5e-2d1c0f6a7b8c</uuid></domain></domstatus>",
    "not-status": "<domain type='kvm'><name>x</name></domain>",
    "entities": "<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domstatus pid='1'>&a;</domstatus>",
})

seeds("phase_line", {
    "start": "\x03train epoch=3 lr=0.001 model=resnet-50\n",
    "end": "\x01-\n",
    "stream": "\x05load\nwarmup batch=1\r\n\n-\n  eval split=val  \nbad name!\n",
    "dup": "\x02train a=1 a=2",
    "long": "\x40" + "x" * 5000 + "\nnext\n",
})

seeds("control_request", {
    "start": '{"vm": "web-01", "phase": "train epoch=3"}\n',
    "end": '{"vm": "570e7a0b-8c3d-4f4a-9b5e-2d1c0f6a7b8c", "phase": "-"}\n',
    "bad-phase": '{"vm": "x", "phase": "bad name!"}\n',
    "not-json": "train epoch=3\n",
    "extra": '{"vm": "x", "phase": "p", "more": 1}\n{"vm": "y"}\n',
})
