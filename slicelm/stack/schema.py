"""``python -m slicelm.stack.schema > slicelm/stack/stack.schema.json`` regenerates the checked-in schema."""

import json

from slicelm.stack.spec import export_schema

if __name__ == "__main__":
    print(json.dumps(export_schema(), indent=2))
