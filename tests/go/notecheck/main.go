// notecheck opens a signed note with golang.org/x/mod/sumdb/note (vendored
// in ./note, unchanged, from golang.org/x/mod at commit fe2ec04): the
// reference implementation twokey's checkpoints must stay readable by.
//
// Usage: notecheck NOTE_FILE VERIFIER_KEY [VERIFIER_KEY...]
//
// Prints the note's text, then one "signed-by NAME HASH" line per signature
// verified by one of the given keys, and exits 0; exits 1 with the reason
// when the note does not open.
package main

import (
	"fmt"
	"os"

	"twokey.test/notecheck/note"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: notecheck NOTE_FILE VERIFIER_KEY...")
		os.Exit(2)
	}
	msg, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var verifiers []note.Verifier
	for _, key := range os.Args[2:] {
		v, err := note.NewVerifier(key)
		if err != nil {
			fmt.Fprintf(os.Stderr, "verifier key %q: %v\n", key, err)
			os.Exit(2)
		}
		verifiers = append(verifiers, v)
	}
	n, err := note.Open(msg, note.VerifierList(verifiers...))
	if err != nil {
		fmt.Fprintln(os.Stderr, "note does not open:", err)
		os.Exit(1)
	}
	fmt.Print(n.Text)
	for _, s := range n.Sigs {
		fmt.Printf("signed-by %s %08x\n", s.Name, s.Hash)
	}
	fmt.Printf("unverified %d\n", len(n.UnverifiedSigs))
}
