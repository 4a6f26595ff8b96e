#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Write org.diskchain.DiskChain1(5), the D-Bus API as a man page, from the
introspection files in interfaces/: every interface, method, property and
signal with its signature and the comment above it in the XML.  Run at build
time, so the page cannot drift from the files the daemon's API is checked
against.

    interfaces-to-man.py OUTPUT VERSION FILE.xml...
"""
import sys
import xml.etree.ElementTree as ET

ORDER = ["Manager", "Image", "Chain", "Job", "Export", "Plan"]


def esc(text):
    """Text as troff reads it: backslashes doubled, dashes and quotes made literal, no control
    character at a line's start."""
    text = " ".join(text.split())
    text = text.replace("\\", "\\e").replace("-", "\\-").replace("'", "\\(aq").replace('"', "\\(dq")
    return "\\&" + text if text[:1] in (".", "'") else text


def parse(path):
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    with open(path, "rb") as f:
        return ET.fromstring(f.read(), parser=parser)


def items(elem):
    """(comment or None, child) for each element child of ELEM, the comment the one just above it."""
    note = None
    for child in elem:
        if child.tag is ET.Comment:
            note = child.text.strip()
            continue
        yield note, child
        note = None


def signature(m, direction_default):
    args = []
    for a in m.findall("arg"):
        d = a.get("direction", direction_default)
        args.append((d, a.get("type"), a.get("name") or ""))
    return args


def emit_member(out, title, note):
    out.append(".TP")
    out.append(title)
    out.append(esc(note) if note else "(undocumented)")


def main():
    output, version, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    nodes = {}
    for path in files:
        root = parse(path)
        top_note = None
        for note, child in items(root):
            if child.tag == "interface":
                top_note = note
                nodes[child.get("name")] = (top_note, child)
    if not nodes:
        sys.exit("no interfaces found")

    def key(name):
        short = name.rsplit(".", 1)[-1]
        return (ORDER.index(short) if short in ORDER else len(ORDER), name)

    out = [
        '.TH "ORG.DISKCHAIN.DISKCHAIN1" "5" "" "diskchain %s" "diskchain"' % version,
        ".nh",
        ".ad l",
        ".SH NAME",
        "org.diskchain.DiskChain1 \\- the D\\-Bus API of diskchaind",
        ".SH SYNOPSIS",
        ".nf",
        "Bus name: \\fBorg.diskchain.DiskChain1\\fR on the system bus",
        "Manager:  \\fB/org/diskchain/DiskChain1\\fR",
        "Images:   \\fB/org/diskchain/DiskChain1/image/\\fIescaped path\\fR",
        "Chains:   \\fB/org/diskchain/DiskChain1/chain/\\fIescaped path of the active layer\\fR",
        "Jobs:     \\fB/org/diskchain/DiskChain1/job/\\fIid\\fR",
        "Exports:  \\fB/org/diskchain/DiskChain1/export/\\fIname\\fR",
        "Plans:    \\fB/org/diskchain/DiskChain1/plan/\\fIname\\fR",
        ".fi",
        ".SH DESCRIPTION",
        "This page is generated from the introspection files installed in",
        ".IR /usr/share/dbus\\-1/interfaces/ ,",
        "the same text a D\\-Bus client reads.",
        "The manager implements",
        ".B org.freedesktop.DBus.ObjectManager",
        "at",
        ".BR /org/diskchain/DiskChain1 :",
        "a client gets every object with",
        ".B GetManagedObjects",
        "and then follows",
        ".B InterfacesAdded",
        "and",
        ".BR InterfacesRemoved ;",
        "properties change with",
        ".BR org.freedesktop.DBus.Properties.PropertiesChanged ,",
        "except those marked const.",
        "Every method is authorized through polkit (the action is named with each);",
        "errors are",
        ".BI org.diskchain.DiskChain1.Error. Name",
        "with a message naming the object and the problem, or the standard",
        ".B org.freedesktop.DBus.Error",
        "names for bad arguments and denied access.",
        "Options maps",
        ".RB ( a{sv} )",
        "refuse unknown keys and values of the wrong type.",
    ]
    for name in sorted(nodes, key=key):
        note, iface = nodes[name]
        out.append('.SH "INTERFACE %s"' % esc(name))
        if note:
            out.append(esc(note))
        methods = [(n, e) for n, e in items(iface) if e.tag == "method"]
        props = [(n, e) for n, e in items(iface) if e.tag == "property"]
        signals = [(n, e) for n, e in items(iface) if e.tag == "signal"]
        if methods:
            out.append(".SS Methods")
            for n, m in methods:
                args = signature(m, "in")
                ins = ", ".join("\\fI%s\\fR %s" % (t, esc(nm)) for d, t, nm in args if d == "in")
                outs = ", ".join("\\fI%s\\fR %s" % (t, esc(nm)) for d, t, nm in args if d == "out")
                title = "\\fB%s\\fR(%s)" % (m.get("name"), ins)
                if outs:
                    title += " \\(-> (%s)" % outs
                emit_member(out, title, n)
        if props:
            out.append(".SS Properties")
            for n, p in props:
                const = any(a.get("name") == "org.freedesktop.DBus.Property.EmitsChangedSignal"
                            and a.get("value") == "const" for a in p.findall("annotation"))
                title = "\\fB%s\\fR \\fI%s\\fR, %s%s" % (p.get("name"), p.get("type"), p.get("access"),
                                                       ", const" if const else "")
                emit_member(out, title, n)
        if signals:
            out.append(".SS Signals")
            for n, s in signals:
                args = ", ".join("\\fI%s\\fR %s" % (t, esc(nm)) for _, t, nm in signature(s, "out"))
                emit_member(out, "\\fB%s\\fR(%s)" % (s.get("name"), args), n)
    out += [
        ".SH EXAMPLES",
        "Find the chain of vm.qcow2 (a path relative to the first storage root) and back it up:",
        ".PP",
        ".EX",
        "chain=$(busctl \\-\\-json=short call org.diskchain.DiskChain1 /org/diskchain/DiskChain1 \\e",
        "    org.diskchain.DiskChain1.Manager GetChain s vm.qcow2 | jq \\-r \\(aq.data[0]\\(aq)",
        "gdbus call \\-\\-system \\-\\-dest org.diskchain.DiskChain1 \\-\\-object\\-path \"$chain\" \\e",
        "    \\-\\-method org.diskchain.DiskChain1.Chain.Backup vm\\-backup.qcow2 \\(aq{}\\(aq",
        ".EE",
        ".SH SEE ALSO",
        ".BR diskchaind (8),",
        ".BR diskchainctl (1),",
        ".BR diskchain.conf (5),",
        ".BR diskchain.plan (5),",
        ".BR busctl (1),",
        ".BR gdbus (1)",
    ]
    with open(output, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
