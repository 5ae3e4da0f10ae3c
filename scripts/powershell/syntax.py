"""Parses PowerShell scripts with tree-sitter's PowerShell grammar and reports every
syntax error (a node the grammar could not place, or one it had to invent), with its
line and column. Exit status 1 if any script has one."""

import sys

import tree_sitter
import tree_sitter_powershell


def errors(node, found):
    if node.type == "ERROR" or node.is_missing:
        found.append(node)
    for child in node.children:
        errors(child, found)
    return found


def main(paths):
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    failed = False
    for path in paths:
        source = open(path, "rb").read()
        found = errors(parser.parse(source).root_node, [])
        for node in found:
            line, column = node.start_point
            what = f"missing {node.type}" if node.is_missing else "cannot parse"
            text = source[node.start_byte : node.end_byte][:60].decode(errors="replace")
            print(f"{path}:{line + 1}:{column + 1}: {what}: {text!r}")
        failed |= bool(found)
        if not found:
            print(f"{path}: parses")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
