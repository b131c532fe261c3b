// The kernel matrix's Go client (xtask/guest/init.sh, check_plaintext):
// Go's crypto/tls, probed by symbol at the entry and the returns of
// (*Conn).Write and Read. argv: addr line. Sends the line, prints the
// answer line (`openssl s_server -rev` echoes it reversed). The guest's
// certificate is self-signed with no SAN: not verified.
package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: addr line")
		os.Exit(2)
	}
	c, err := tls.Dial("tcp", os.Args[1], &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer c.Close()
	if _, err := c.Write([]byte(os.Args[2] + "\n")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Print(line)
}
