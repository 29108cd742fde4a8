"""The services file's entry cache: the same result as a fresh full parse, edit after edit."""

from __future__ import annotations

import random

import pytest

from pykp.sources.services_file import ServicesFileCache, load_services_text


def _entry(rng: random.Random, index: int) -> str:
    name = rng.choice([f"svc-{index}", f"svc-{index}", "dup", "Bad_Name"])
    ip = rng.choice([f"10.96.{index // 256}.{index % 256}", "10.96.9.9", "10.96.0.300"])
    lines = [f"  - name: {name}"]
    if rng.random() < 0.3:
        lines.append(f"    namespace: ns-{rng.randrange(3)}")
    if rng.random() < 0.9:
        lines.append(f"    clusterIP: {ip}")
    if rng.random() < 0.05:
        lines.append("    unknownField: 1")
    choice = rng.random()
    if choice < 0.9:
        lines.append("    ports:")
        lines.append(f"      - {{port: {rng.choice([80, 80, 0])}, targetPort: 8080}}")
        if rng.random() < 0.3:
            lines[-1] = "      - {name: a, port: 80, targetPort: 8080}"
            lines.append(f"      - {{name: b, port: 443, nodePort: {rng.choice([30001, 30002])}}}")
    lines.append("    endpoints:")
    for k in range(rng.randrange(4)):
        address = rng.choice([f"10.244.{index % 256}.{k}", "10.244.0.1", "not-an-ip"])
        lines.append(f"      - {{ip: {address}, ready: {rng.choice(['true', 'maybe'])}}}")
    if rng.random() < 0.2:
        lines.append("# a comment between entries")
    return "\n".join(lines) + "\n"


def _text(entries: list[str], header: str, trailer: str) -> str:
    return header + "services:\n" + "".join(entries) + trailer


@pytest.mark.parametrize("seed", range(8))
def test_the_cached_path_equals_a_full_parse_through_random_edits(seed: int) -> None:
    rng = random.Random(seed)
    entries = [_entry(rng, index) for index in range(30)]
    cache = ServicesFileCache()
    counter = 1000
    header, trailer = "defaults:\n  policy: random\n", ""
    for _ in range(40):
        edit = rng.random()
        if edit < 0.25 and entries:
            del entries[rng.randrange(len(entries))]
        elif edit < 0.5:
            counter += 1
            entries.insert(rng.randrange(len(entries) + 1), _entry(rng, counter))
        elif edit < 0.75 and entries:
            counter += 1
            entries[rng.randrange(len(entries))] = _entry(rng, counter)
        elif edit < 0.9 and len(entries) > 1:
            moved = entries.pop(rng.randrange(len(entries)))
            entries.insert(rng.randrange(len(entries) + 1), moved)
        elif edit < 0.95:
            header = rng.choice(["defaults:\n  policy: maglev\n", "", "# top\nwhat: 1\n"])
        else:
            trailer = rng.choice(["", "extra: true\n", "defaults: {policy: nope}\n"])
        text = _text(entries, header, trailer)
        assert cache.load(text, "s.yaml") is not None, "the plain block style is split"
        cached = load_services_text(text, "s.yaml", cache)
        fresh = load_services_text(text, "s.yaml")
        assert cached == fresh
    again = load_services_text(_text(entries, header, trailer), "s.yaml", cache)
    assert all(a is b for a, b in zip(again[0].services, cached[0].services, strict=True))


@pytest.mark.parametrize(
    "text",
    [
        "services: []\n",
        "services:\n- {name: a, clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
        "services: &x\n  - name: a\n",
        "---\nservices:\n  - name: a\n",
        "services:\n  - &a {name: a, clusterIP: 10.0.0.1, ports: [{port: 80}]}\n  - *a\n",
        "services:\n  - name: a\n    clusterIP: 10.0.0.1\n    ports: [{port: 80}]\nservices: []\n",
        "",
    ],
)
def test_other_styles_fall_back_to_the_same_result(text: str) -> None:
    cache = ServicesFileCache()
    assert load_services_text(text, "s.yaml", cache) == load_services_text(text, "s.yaml")


def _crowded_entry(rng: random.Random, indent: str) -> str:
    """An entry drawn from small pools, so names, frontends and nodePorts collide often
    (and chains form: one entry's conflict frees a frontend another then claims)."""
    name = f"s{rng.randrange(6)}"
    lines = [f"{indent}- name: {name}"]
    if rng.random() < 0.2:
        lines.append(f"{indent}  namespace: n{rng.randrange(2)}")
    if rng.random() < 0.85:
        lines.append(f"{indent}  clusterIPs: [10.0.0.{rng.randrange(4)}]")
    if rng.random() < 0.2:
        lines.append(f"{indent}  externalIPs: [192.0.2.{rng.randrange(3)}]")
    lines.append(f"{indent}  ports:")
    for index in range(rng.choice([1, 1, 2])):
        port = rng.choice([80, 443, 53])
        node_port = rng.choice(["", "", f", nodePort: {rng.choice([30001, 30002, 30003])}"])
        bad = rng.random() < 0.05
        lines.append(
            f"{indent}    - {{name: p{index}, port: {0 if bad else port}, protocol:"
            f" {rng.choice(['TCP', 'UDP'])}{node_port}}}"
        )
    if rng.random() < 0.5:
        lines.append(f"{indent}  endpoints:")
        for k in range(rng.randrange(3)):
            address = rng.choice([f"10.244.0.{k}", "10.244.0.1", "bad"])
            lines.append(f"{indent}    - {{ip: {address}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", range(12))
def test_the_checks_across_entries_follow_every_edit(seed: int) -> None:
    """Repeated names, frontends and nodePorts, identical entries, a changed indent, a
    changed default policy and loads that fall back to a full parse in between: the cache
    keeps its counts of who claims what right."""
    rng = random.Random(1000 + seed)
    indent = "  "
    entries = [_crowded_entry(rng, indent) for _ in range(12)]
    header = ""
    cache = ServicesFileCache()
    for _ in range(60):
        edit = rng.random()
        if edit < 0.2 and entries:
            del entries[rng.randrange(len(entries))]
        elif edit < 0.4:
            entries.insert(rng.randrange(len(entries) + 1), _crowded_entry(rng, indent))
        elif edit < 0.55 and entries:
            entries.insert(rng.randrange(len(entries) + 1), rng.choice(entries))  # the same text
        elif edit < 0.7 and entries:
            entries[rng.randrange(len(entries))] = _crowded_entry(rng, indent)
        elif edit < 0.8 and len(entries) > 1:
            moved = entries.pop(rng.randrange(len(entries)))
            entries.insert(rng.randrange(len(entries) + 1), moved)
        elif edit < 0.85:
            new = rng.choice(["", "  "])
            entries = [
                "".join(new + line[len(indent) :] + "\n" for line in entry.splitlines())
                for entry in entries
            ]
            indent = new
        elif edit < 0.9:
            header = rng.choice(["", "defaults: {policy: maglev}\n"])
        else:  # a version the cache does not take: the next one is still exact
            flow = "services: [" + ", ".join("{name: x}" for _ in entries) + "]\n"
            assert load_services_text(flow, "s.yaml", cache) == load_services_text(flow, "s.yaml")
            continue
        text = header + "services:\n" + "".join(entries)
        assert cache.load(text, "s.yaml") is not None, "the plain block style is split"
        cached = load_services_text(text, "s.yaml", cache)
        fresh = load_services_text(text, "s.yaml")
        assert cached == fresh
