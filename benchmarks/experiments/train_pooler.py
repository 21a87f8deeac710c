"""Scratch: peft_qlora.main with BERT's pooler trained alongside the classifier (--pooler)."""
import sys
sys.path.insert(0, ".")
import peft
import peft_qlora
if "--pooler" in sys.argv:
    sys.argv.remove("--pooler")
    Original = peft.LoraConfig
    def patched(*a, **k):
        k["modules_to_save"] = list(k.get("modules_to_save") or []) + ["pooler"]
        return Original(*a, **k)
    peft.LoraConfig = patched
sys.exit(peft_qlora.main(sys.argv[1:]))
