"""``python -m megatron_patch.patches``: each runtime patch x each checked Megatron-Core version (Markdown)."""

from megatron_patch.patches import patch_table

if __name__ == "__main__":
    print(patch_table())
