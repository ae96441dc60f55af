"""Render nbs/index.ipynb to README.md without Quarto (nbconvert), or check that README.md is current.

Cells marked `#| hide` are dropped, cells marked `#| echo: false` keep only their (markdown) outputs, and nbdev
directives (`#| ...`) are stripped from the cells that stay.
Usage: python tools/make_readme.py nbs/index.ipynb README.md [--check]
"""
import re, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

HEADER = "<!-- Generated from nbs/index.ipynb by `make readme`; edit the notebook, not this file. -->\n\n"

def _output_text(output) -> str:
    "The markdown (or plain text) a code cell's output shows."
    if output.get('output_type') == 'stream': return output.get('text', '')
    data = output.get('data', {})
    return data.get('text/markdown') or data.get('text/plain', '')

def render(nb_path: Path) -> str:
    "Markdown for the notebook at `nb_path`, with hidden cells dropped and directives stripped."
    nb = nbformat.read(nb_path, as_version=4)
    cells = []
    for cell in nb.cells:
        src = cell.source
        if cell.cell_type == 'code':
            directives = re.findall(r'^#\|\s*(.*)$', src, flags=re.M)
            if any(d.split()[:1] in (['hide'], ['export'], ['exporti'], ['default_exp']) for d in directives): continue
            if any(re.fullmatch(r'echo:\s*false', d.strip()) for d in directives):   # a table computed by code: its output only
                cells += [nbformat.v4.new_markdown_cell(_output_text(o)) for o in cell.get('outputs', []) if _output_text(o)]
                continue
            cell.source = re.sub(r'^#\|.*\n?', '', src, flags=re.M).strip()
        cells.append(cell)
    nb.cells = cells
    body, _ = MarkdownExporter().from_notebook_node(nb)
    body = re.sub(r'\n{3,}', '\n\n', body).strip() + '\n'
    body = re.sub(r'\]\((?!https?://|/|#)([^)]+)\)', lambda m: f'](nbs/{m.group(1)})', body)   # links relative to nbs/
    return HEADER + body

def main(argv):
    check = '--check' in argv
    nb_path, out_path = map(Path, [a for a in argv if not a.startswith('--')][:2])
    text = render(nb_path)
    if check:
        current = out_path.read_text(encoding='utf-8') if out_path.exists() else ''
        if current != text:
            sys.exit(f"{out_path} is stale: it differs from {nb_path}. Run `make readme` and commit the result.")
        print(f"{out_path} is up to date with {nb_path}")
        return
    tmp = out_path.with_suffix('.tmp')
    tmp.write_text(text, encoding='utf-8')
    tmp.replace(out_path)
    print(f"wrote {out_path}")

if __name__ == '__main__': main(sys.argv[1:])
